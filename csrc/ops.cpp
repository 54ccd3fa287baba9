// The op schemas, defined once. CPU kernels (csrc/cpu/) and CUDA kernels (csrc/cuda/, a second
// library loaded after this one) register implementations under these names, so PyTorch picks
// the kernel by the device of the inputs. Shapes and semantics: dvae_kernels/<op>.py, whose
// torch backend is the reference each kernel matches (NaN behaviour included).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(dvae_kernels, m) {
  // logits [R, V] (unit column stride), tokens [R] -> (logp [R], lse [R], entropy [R]) float32.
  m.def("token_logprobs_fwd(Tensor logits, Tensor tokens) -> (Tensor, Tensor, Tensor)");
  // grad_logits [R, V] contiguous, in the logits dtype.
  m.def("token_logprobs_bwd(Tensor? grad_logp, Tensor? grad_entropy, Tensor logits, "
        "Tensor tokens, Tensor lse, Tensor entropy) -> Tensor");
  // -> (loss [R] = -w·logp float32, grad [R, V] = w·(softmax - onehot) or an empty [0]).
  m.def("weighted_token_nll_fwd(Tensor logits, Tensor tokens, Tensor weights, "
        "bool compute_grad) -> (Tensor, Tensor)");
  // logits [R, V] (unit column stride) plus bias [V] float32 (or none), seeds int64 [2] ->
  // (tokens int64 [R], logp float32 [R]): rows row0 .. row0 + R of the random stream of
  // dvae_kernels/sample_tokens.py. CPU only (on CUDA the Triton kernels serve).
  m.def("sample_tokens_fwd(Tensor logits, Tensor? bias, Tensor seeds, float temperature, "
        "int row0) -> (Tensor, Tensor)");
  // q [B, H, T, D], k and v [B, H, S, D] float32 (unit stride along D) -> (out [B, H, T, D]
  // (stored [B, T, H, D]), lse [B, H, T]): softmax(scale·q·kᵀ)·v, causal = key j <= query t.
  // CPU only (dvae/models/fused.py's ``attention``).
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale) "
        "-> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "bool causal, float scale) -> (Tensor, Tensor, Tensor)");
  // rewards, logq [N, K] float32; beta, eta 0-d float32 -> (weights [N, K], ess [N]).
  m.def("daps_weights_fwd(Tensor rewards, Tensor logq, Tensor beta, Tensor eta) "
        "-> (Tensor, Tensor)");
  // -> eta, a 0-d float32 tensor on the inputs' device (bisection in log eta, no host sync).
  m.def("solve_eta_fwd(Tensor rewards, Tensor logq, Tensor beta, float ess_target, float eta_min, "
        "float eta_max) -> Tensor");
}

// A Python module only so that `import dvae_kernels._C` loads the library (and runs the
// registrations above); the ops are reached through torch.ops.dvae_kernels.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
