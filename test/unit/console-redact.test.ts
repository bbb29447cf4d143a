// The console's line redactor and the firmware "nothing to boot" watch (src/vm/console.ts).
import { test } from "node:test";
import assert from "node:assert/strict";
import { LineRedactor, NoBootWatch } from "../../src/vm/console.js";
import { redactAll } from "../../src/vm/run.js";

function redactor(secrets: string[], maxHold?: number): { r: LineRedactor; out: string[] } {
  const out: string[] = [];
  const r = new LineRedactor((t) => redactAll(t, secrets), (t) => out.push(t), { longestSecret: Math.max(...secrets.map((s) => s.length)), ...(maxHold ? { maxHold } : {}) });
  return { r, out };
}

test("a secret split across two reads is redacted", () => {
  const { r, out } = redactor(["hunter2-secret"]);
  r.push("token: hunter2-");
  r.push("secret and more\nnext ");
  r.push("line\n");
  r.end();
  assert.equal(out.join(""), "token: *** and more\nnext line\n");
  assert.ok(!out.some((o) => o.includes("hunter2")), JSON.stringify(out));
});

test("a secret split byte by byte is redacted; whole lines pass at once", () => {
  const { r, out } = redactor(["abcd-1234"]);
  for (const ch of "x abcd-1234 y\n") r.push(ch);
  r.end();
  assert.deepEqual(out, ["x *** y\n"]);
});

test("a very long line is passed on in pieces, and a secret at a piece boundary is still redacted", () => {
  const secret = "S3CRET-0123456789";
  const { r, out } = redactor([secret], 100);
  // The secret straddles the point where the redactor must give up holding the line.
  const line = "a".repeat(95) + secret + "b".repeat(300);
  for (let i = 0; i < line.length; i += 7) r.push(line.slice(i, i + 7));
  assert.ok(out.length > 0, "nothing passed on while the line kept growing");
  const heldBack = line.length - out.join("").length;
  assert.ok(heldBack < 200, `held back ${heldBack} characters of an unfinished line`);
  r.end();
  assert.equal(out.join(""), "a".repeat(95) + "***" + "b".repeat(300));
  assert.ok(!out.join("").includes("S3CRET"));
});

test("end() flushes an unfinished last line, redacted", () => {
  const { r, out } = redactor(["p4ssword!"]);
  r.push("done\nlast p4ss");
  assert.equal(out.join(""), "done\n");
  r.push("word! without newline");
  r.end();
  assert.equal(out.join(""), "done\nlast *** without newline");
});

test("each line of a multi-line secret is redacted (the console is redacted line by line)", () => {
  const key = "-----BEGIN KEY-----\nAAAABBBBCCCCDDDD\nEEEEFFFFGGGGHHHH\n-----END KEY-----";
  const { r, out } = redactor([key]);
  r.push(`cat key:\n${key.replace(/\n/g, "\r\n")}\r\n`);
  r.end();
  const text = out.join("");
  assert.doesNotMatch(text, /AAAABBBB|EEEEFFFF/);
});

test("no secrets: text passes unchanged", () => {
  const out: string[] = [];
  const r = new LineRedactor((t) => redactAll(t, []), (t) => out.push(t), { longestSecret: 0 });
  r.push("a\nb");
  r.end();
  assert.equal(out.join(""), "a\nb");
});

test("no-boot: SeaBIOS's and OVMF's messages are found, escape sequences and all", () => {
  const sea = new NoBootWatch();
  assert.equal(sea.push("\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16.2)\r\nBooting from Hard Disk...\r\nBoot failed: not a bootable disk\r\n\r\n"), undefined);
  assert.equal(sea.push("No bootable device.\r\n"), "No bootable device.");
  const ovmf = new NoBootWatch();
  assert.equal(ovmf.push('BdsDxe: failed to load Boot0001 "UEFI Misc Device" from PciRoot(0x0)/Pci(0x1,0x0): Not Found\r\nBdsDxe: No bootable option or device was found.\r\n'), "BdsDxe: No bootable option or device was found.");
});

test("no-boot: the same words from a booted OS or after the firmware's window are ignored", () => {
  const grub = new NoBootWatch();
  assert.equal(grub.push("Booting from Hard Disk...\r\nGRUB loading.\r\n"), undefined);
  assert.equal(grub.push("No bootable device.\r\n"), undefined);
  const late = new NoBootWatch();
  late.push("x".repeat(70 * 1024) + "\n");
  assert.equal(late.push("No bootable device.\n"), undefined);
});
