// Vitest config for the conformance harness (see conformance.test.mjs).
// Mirrors the options the package's CLI passes to vitest (run mode, no
// coverage, vitest default timeouts: testTimeout 5000 ms, hookTimeout
// 10000 ms; individual suite tests raise their own timeouts where needed).
import { defineConfig } from "vitest/config"

export default defineConfig({
  test: {
    root: import.meta.dirname,
    include: ["conformance.test.mjs"],
    exclude: ["**/node_modules/**"],
    coverage: { enabled: false },
    passWithNoTests: false,
    watch: false,
  },
})
