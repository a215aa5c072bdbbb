import { defineConfig } from "vite";

// The build is committed under serving/console_static/ so that installs, CI and
// `make test` need no Node; `make console` rebuilds it.
export default defineConfig({
  base: "/console/",
  build: {
    outDir: "../serving/console_static",
    emptyOutDir: true,
    // No data: URIs and no inline code: the console's CSP allows scripts from 'self' only.
    assetsInlineLimit: 0,
    modulePreload: { polyfill: false },
    target: "es2022",
    sourcemap: false,
    reportCompressedSize: false,
  },
});
