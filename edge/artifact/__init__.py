"""What a build writes besides the graphs: the manifest, genai_config, the licence, and the platform bundles."""
