/** Browser test helpers: a static file server with cross-origin isolation headers, and Debian's Chromium
 * driven by puppeteer-core (no browser download; CHROMIUM overrides /usr/bin/chromium). */

import { createReadStream, statSync } from 'node:fs';
import { createServer } from 'node:http';
import path from 'node:path';

import puppeteer from 'puppeteer-core';

import { tempDir } from './helpers.js';

export const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const TYPES = { '.html': 'text/html', '.js': 'text/javascript', '.mjs': 'text/javascript', '.wasm': 'application/wasm', '.json': 'application/json' };

/** Serve `root` on 127.0.0.1 (a free port) as a plain static server with COOP/COEP; resolves to {url, close}. */
export function serveStatic(root) {
  const server = createServer((req, res) => {
    const rel = decodeURIComponent(new URL(req.url, 'http://x').pathname).replace(/\/$/, '/index.html');
    const file = path.join(root, path.normalize(rel));
    let ok = file.startsWith(root + path.sep);
    try {
      ok &&= statSync(file).isFile();
    } catch {
      ok = false;
    }
    const headers = {
      'Cross-Origin-Opener-Policy': 'same-origin', 'Cross-Origin-Embedder-Policy': 'require-corp', 'Cache-Control': 'no-store',
    };
    if (!ok) {
      res.writeHead(404, headers).end();
      return;
    }
    res.writeHead(200, { ...headers, 'Content-Type': TYPES[path.extname(file)] ?? 'application/octet-stream' });
    createReadStream(file).pipe(res);
  });
  return new Promise((resolve) => {
    server.listen(0, '127.0.0.1', () => {
      const close = () => new Promise((r) => {
        server.close(r);
        server.closeAllConnections(); // Chromium keeps connections alive
      });
      resolve({ url: `http://127.0.0.1:${server.address().port}/`, close });
    });
  });
}

/** Headless Chromium with the flags that work as root here, a fresh profile, and `extraArgs`. */
export async function launchChromium(extraArgs = []) {
  const profile = tempDir('qwen-edge-chromium-');
  const browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', `--user-data-dir=${profile}`, ...extraArgs,
    ],
  });
  return browser;
}

/** Open the chat page at `url` and wait until it is ready (or failed); returns {page, state, status}. */
export async function openPage(browser, url, { timeout = 120000 } = {}) {
  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(url);
  await page.waitForFunction(() => document.body.dataset.state !== 'loading', { timeout });
  const state = await page.evaluate(() => document.body.dataset.state);
  const status = await page.$eval('#status', (e) => e.textContent);
  return { page, state, status, errors };
}
