// civm's version, one place for `civm --version` and civm_build_info (a unit test keeps it
// equal to package.json's).
export const CIVM_VERSION = "0.1.0";
