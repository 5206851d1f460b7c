/** Service worker of the chat page: its own files from the network, else (offline) from the copy app.js keeps
 * in Cache Storage. The model files are not its business: WebArtifact caches and checks those. */

const PAGE_CACHE = 'qwen-edge-page';
const scope = new URL(self.registration.scope).pathname;

self.addEventListener('install', () => self.skipWaiting());
self.addEventListener('activate', (event) => event.waitUntil(self.clients.claim()));
self.addEventListener('fetch', (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== 'GET' || url.origin !== location.origin || !url.pathname.startsWith(scope)) return;
  event.respondWith(
    fetch(event.request).catch(async () => {
      const cache = await caches.open(PAGE_CACHE);
      return (await cache.match(event.request, { ignoreSearch: true })) ?? Response.error();
    }),
  );
});
