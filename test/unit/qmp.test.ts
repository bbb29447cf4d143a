import { test } from "node:test";
import assert from "node:assert/strict";
import { createServer, type Socket } from "node:net";
import { join } from "node:path";
import { QmpClient, QmpError, type QmpEvent } from "../../src/vm/qmp.js";
import { tempDir } from "../support/paths.js";

/** A fake QMP server: greeting, then answers each command with `handler`. */
function fakeQmp(handler: (cmd: { execute: string; arguments?: unknown; id?: string }, sock: Socket) => unknown) {
  const path = join(tempDir(), "qmp.sock");
  const received: string[] = [];
  const server = createServer((sock) => {
    sock.write(JSON.stringify({ QMP: { version: {}, capabilities: [] } }) + "\n");
    let buf = "";
    sock.on("data", (d) => {
      buf += d.toString();
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const cmd = JSON.parse(buf.slice(0, nl));
        buf = buf.slice(nl + 1);
        received.push(cmd.execute);
        const out = handler(cmd, sock);
        if (out !== undefined) sock.write(JSON.stringify({ ...(out as object), id: cmd.id }) + "\n");
      }
    });
  });
  return new Promise<{ path: string; received: string[]; close: () => void }>((resolve) =>
    server.listen(path, () => resolve({ path, received, close: () => server.close() })),
  );
}

test("negotiates capabilities, matches replies by id, surfaces events", async () => {
  const srv = await fakeQmp((cmd, sock) => {
    if (cmd.execute === "query-status") {
      sock.write(JSON.stringify({ event: "DEVICE_TRAY_MOVED", data: { id: "cfgcd", "tray-open": true } }) + "\n");
      return { return: { status: "running" } };
    }
    return { return: {} };
  });
  const c = await QmpClient.connect(srv.path);
  const events: QmpEvent[] = [];
  c.on("event", (e: QmpEvent) => events.push(e));
  const st = await c.execute<{ status: string }>("query-status");
  assert.equal(st.status, "running");
  assert.deepEqual(srv.received, ["qmp_capabilities", "query-status"]);
  assert.equal(events[0]?.event, "DEVICE_TRAY_MOVED");
  assert.equal(events[0]?.data?.id, "cfgcd");
  c.close();
  srv.close();
});

test("a QMP error reply rejects with its class and description", async () => {
  const srv = await fakeQmp((cmd) =>
    cmd.execute === "eject" ? { error: { class: "GenericError", desc: "Device 'x' not found" } } : { return: {} },
  );
  const c = await QmpClient.connect(srv.path);
  await assert.rejects(c.execute("eject", { id: "x" }), (e: unknown) => e instanceof QmpError && e.qmpClass === "GenericError" && /not found/.test(e.message));
  c.close();
  srv.close();
});

test("pending commands reject when the connection closes", async () => {
  const srv = await fakeQmp((cmd, sock) => {
    if (cmd.execute === "system_powerdown") sock.destroy();
    return cmd.execute === "system_powerdown" ? undefined : { return: {} };
  });
  const c = await QmpClient.connect(srv.path);
  await assert.rejects(c.execute("system_powerdown"), /closed/);
  assert.equal(c.isClosed, true);
  srv.close();
});

test("connect retries until the socket appears, and gives up when QEMU is gone", async () => {
  const path = join(tempDir(), "late.sock");
  const start = Date.now();
  await assert.rejects(QmpClient.connect(path, { timeoutMs: 300, isAlive: () => Date.now() - start < 100 }), /QEMU exited/);
  await assert.rejects(QmpClient.connect(path, { timeoutMs: 200 }), /could not connect/);
});
