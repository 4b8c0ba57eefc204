/** The examples find the address and the token as the runservice CLI does. */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, it } from "node:test";

import { DEFAULT_ADDR, addrFromEnv, dataDir, isLoopback, tokenFromEnv } from "../examples/env";

describe("the examples' address and token", () => {
  const home = mkdtempSync(join(tmpdir(), "runservice-env-"));
  writeFileSync(join(home, "dev-token"), "  dev-secret\n", { mode: 0o600 });
  after(() => rmSync(home, { recursive: true, force: true }));

  it("prefers RUNSERVICE_TOKEN to the dev token", () => {
    const env = { RUNSERVICE_HOME: home, RUNSERVICE_TOKEN: "env-secret" };
    assert.equal(tokenFromEnv("127.0.0.1:50051", env), "env-secret");
  });

  it("reads the dev token, trimmed, for a loopback address", () => {
    for (const addr of ["127.0.0.1:50051", "localhost:50051", "[::1]:50051", "127.0.0.2:1", "127.0.0.1"]) {
      assert.equal(tokenFromEnv(addr, { RUNSERVICE_HOME: home, RUNSERVICE_TOKEN: "" }), "dev-secret", addr);
    }
  });

  it("sends no dev token off loopback", () => {
    for (const addr of ["10.0.0.1:50051", "example.com:50051", "[::2]:50051", "::1"]) {
      assert.equal(tokenFromEnv(addr, { RUNSERVICE_HOME: home }), undefined, addr);
    }
  });

  it("has no token when the dev-token file is absent", () => {
    const empty = mkdtempSync(join(tmpdir(), "runservice-env-"));
    try {
      assert.equal(tokenFromEnv("127.0.0.1:50051", { RUNSERVICE_HOME: empty }), undefined);
    } finally {
      rmSync(empty, { recursive: true, force: true });
    }
  });

  it("looks in ~/.local/share/runservice without RUNSERVICE_HOME", () => {
    assert.match(dataDir({}), /\/\.local\/share\/runservice$/);
    assert.equal(dataDir({ RUNSERVICE_HOME: home }), home);
  });

  it("defaults the address to the development server", () => {
    assert.equal(addrFromEnv({}), DEFAULT_ADDR);
    assert.equal(addrFromEnv({ RUNSERVICE_ADDR: "" }), DEFAULT_ADDR);
    assert.equal(addrFromEnv({ RUNSERVICE_ADDR: "10.1.2.3:9" }), "10.1.2.3:9");
  });

  it("judges loopback as the CLI does", () => {
    assert.ok(isLoopback("[0:0:0:0:0:0:0:1]:1"));
    assert.ok(!isLoopback("LOCALHOST:1"));
    assert.ok(!isLoopback("128.0.0.1:1"));
  });
});
