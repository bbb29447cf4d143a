// Public surface of civm's GitHub integration.
export { createOctokit, githubApiUrl, DEFAULT_GITHUB_API_URL, type ClientOptions, type GitHubClient } from "./client.js";
export {
  fetchRegistrationToken,
  parseRunnerTarget,
  describeTarget,
  type RunnerTarget,
  type RegistrationTokenOptions,
} from "./registration-token.js";
export {
  generateJitConfig,
  listRunners,
  getRunner,
  deleteRunner,
  runnersPath,
  createRegistrationToken,
  runnerGroupName,
  githubWebUrl,
  registrationUrl,
  type RegistrationToken,
  type RunnerInfo,
  type JitConfig,
  type JitRequest,
} from "./runners.js";
export { listQueuedJobs, targetRepositories, type QueuedJob } from "./jobs.js";
export { createGitHubAccess, InstallationTokenCache, type GitHubAccess, type GitHubCredentials, type AccessOptions } from "./app-auth.js";
