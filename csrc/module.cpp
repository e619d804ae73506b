// The sophiavl_mcore._C extension: Trust-GRPO reward aggregation, GRPO advantages and
// text-metric kernels (WER, ROUGE, Porter stemmer) and the Qwen2-VL image patchifier.
// numpy buffers in, numpy out.
#include "common.h"
#include "patchify.h"

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "sophiavl_mcore C++ kernels: trust_grpo, group_advantages, batch_wer, batch_rouge, "
      "normalize_patchify";
#ifdef SOPHIAVL_HAVE_OPENMP
  m.attr("HAVE_OPENMP") = true;
#else
  m.attr("HAVE_OPENMP") = false;
#endif
  sophiavl::register_trust_grpo(m);
  sophiavl::register_porter(m);
  sophiavl::register_rouge(m);
  sophiavl::register_wer(m);
  sophiavl::register_patchify(m);
}
