// JIT runner configs live with the other runner endpoints; this module is their named entry.
export { generateJitConfig, type JitConfig, type JitRequest } from "./runners.js";
