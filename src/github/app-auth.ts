// Credentials for `civm serve`: a token, or a GitHub App whose installation tokens
// @octokit/auth-app creates, caches and renews before they expire (one client per
// installation, found per organization or repository and remembered). Retries and rate
// limits as in client.ts.
import { createAppAuth } from "@octokit/auth-app";
import { CivmOctokit, createOctokit, octokitOptions, type ClientOptions, type GitHubClient } from "./client.js";
import type { RunnerTarget } from "./registration-token.js";
import { apiFailure } from "./runners.js";

export type GitHubCredentials = { kind: "token"; token: string } | { kind: "app"; appId: number; privateKey: string; installationId?: number | undefined };

export interface GitHubAccess {
  /** A client allowed to manage the target's runners. */
  client(t: RunnerTarget): Promise<GitHubClient>;
}

export type AccessOptions = Omit<ClientOptions, "token"> & {
  baseUrl: string;
  /** Renew an installation token this long before it expires (default 5 min). */
  refreshBeforeMs?: number;
  /** Clock for the token cache (tests). */
  now?: () => number;
};

/**
 * auth-app's token cache, but one that reads each token's expires_at: a token is handed out
 * only while it has more than `marginMs` to live, so a new one is created before expiry
 * (auth-app's own cache keeps tokens a fixed 59 minutes).
 */
export class InstallationTokenCache {
  private readonly entries = new Map<string, string>();
  constructor(
    private readonly marginMs: number,
    private readonly now: () => number = Date.now,
  ) {}

  get(key: string): string | undefined {
    const v = this.entries.get(key);
    if (v === undefined) return undefined;
    // auth-app's format: token|createdAt|expiresAt|...
    const expires = Date.parse(v.split("|")[2] ?? "");
    if (!(expires - this.now() > this.marginMs)) {
      this.entries.delete(key);
      return undefined;
    }
    return v;
  }

  set(key: string, value: string): void {
    this.entries.set(key, value);
  }
}

export function createGitHubAccess(creds: GitHubCredentials, opts: AccessOptions): GitHubAccess {
  if (creds.kind === "token") {
    const client = createOctokit({ ...opts, token: creds.token });
    return { client: async () => client };
  }
  return new AppAccess(creds, opts);
}

function ownerOf(t: RunnerTarget): string {
  return t.kind === "org" ? t.org : t.owner;
}

class AppAccess implements GitHubAccess {
  private readonly app: GitHubClient;
  private readonly byInstallation = new Map<number, GitHubClient>();
  private readonly installationOf = new Map<string, Promise<number>>();
  private readonly cache: InstallationTokenCache;

  constructor(
    private readonly creds: Extract<GitHubCredentials, { kind: "app" }>,
    private readonly opts: AccessOptions,
  ) {
    this.cache = new InstallationTokenCache(opts.refreshBeforeMs ?? 5 * 60_000, opts.now);
    this.app = this.octokit({ appId: creds.appId, privateKey: creds.privateKey });
  }

  private octokit(auth: Record<string, unknown>): GitHubClient {
    return new CivmOctokit({ authStrategy: createAppAuth, auth: { ...auth, cache: this.cache }, ...octokitOptions(this.opts) });
  }

  async client(t: RunnerTarget): Promise<GitHubClient> {
    const id = await this.installation(t);
    let c = this.byInstallation.get(id);
    if (!c) {
      c = this.octokit({ appId: this.creds.appId, privateKey: this.creds.privateKey, installationId: id });
      this.byInstallation.set(id, c);
    }
    return c;
  }

  /** The App's installation on the target's owner (configured, or asked once with the App's JWT). */
  private installation(t: RunnerTarget): Promise<number> {
    if (this.creds.installationId !== undefined) return Promise.resolve(this.creds.installationId);
    const key = ownerOf(t).toLowerCase();
    let p = this.installationOf.get(key);
    if (!p) {
      const path = t.kind === "org" ? `/orgs/${t.org}/installation` : `/repos/${t.owner}/${t.repo}/installation`;
      p = this.app.request(`GET ${path}`).then(
        (res) => (res.data as { id: number }).id,
        (e: unknown) => {
          this.installationOf.delete(key); // try again next time
          throw apiFailure(`GET ${path} (is the GitHub App installed there?)`, e);
        },
      );
      this.installationOf.set(key, p);
    }
    return p;
  }
}
