// Public surface of civm's GitHub integration.
export { createOctokit, githubApiUrl, DEFAULT_GITHUB_API_URL, type ClientOptions, type GitHubClient } from "./client.js";
export {
  fetchRegistrationToken,
  parseRunnerTarget,
  describeTarget,
  type RunnerTarget,
  type RegistrationTokenOptions,
} from "./registration-token.js";
