// Word error rate with jiwer 4.0's default transform (wer_default):
//   RemoveMultipleSpaces (every run of >= 2 whitespace characters -> " "), Strip,
//   split on " " (empty words dropped).
// So words are separated by a single ' ' or by any run of >= 2 whitespace characters; a
// single non-space whitespace character (e.g. one '\t') between two words does not split
// them, exactly as in jiwer. Whitespace is Python's str.isspace() set. Words compare
// case-sensitively by their UTF-8 bytes.
//
// WER = word-level Levenshtein distance / max(len(ref words), 1): for an empty reference
// this is the number of hypothesis words (jiwer returns the insertion count there too).
#include <algorithm>

#include "common.h"
#include "interner.h"

namespace sophiavl {
namespace {

// Byte length of the whitespace code point starting at p (Python str.isspace()), else 0.
std::size_t whitespace_len(const unsigned char* p, std::size_t left) {
  const unsigned char c = p[0];
  if (c < 0x80) {
    return (c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F)) ? 1 : 0;
  }
  if (c == 0xC2 && left >= 2) return (p[1] == 0x85 || p[1] == 0xA0) ? 2 : 0;
  if (left < 3) return 0;
  if (c == 0xE1) return (p[1] == 0x9A && p[2] == 0x80) ? 3 : 0;  // U+1680
  if (c == 0xE3) return (p[1] == 0x80 && p[2] == 0x80) ? 3 : 0;  // U+3000
  if (c == 0xE2) {
    if (p[1] == 0x80) {  // U+2000..U+200A, U+2028, U+2029, U+202F
      const unsigned char d = p[2];
      return ((d >= 0x80 && d <= 0x8A) || d == 0xA8 || d == 0xA9 || d == 0xAF) ? 3 : 0;
    }
    if (p[1] == 0x81 && p[2] == 0x9F) return 3;  // U+205F
  }
  return 0;
}

// Splits `text` into jiwer words, returned as views into `text`.
void jiwer_words(std::string_view text, std::vector<std::string_view>& words) {
  words.clear();
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const std::size_t n = text.size();
  std::size_t i = 0;
  std::size_t word_start = 0;
  bool in_word = false;
  while (i < n) {
    std::size_t w = whitespace_len(s + i, n - i);
    if (w == 0) {
      if (!in_word) {
        in_word = true;
        word_start = i;
      }
      ++i;
      continue;
    }
    // A whitespace run: count its code points and find its end.
    std::size_t run_end = i, run_chars = 0;
    while (run_end < n && (w = whitespace_len(s + run_end, n - run_end)) != 0) {
      run_end += w;
      ++run_chars;
    }
    const bool at_edge = (i == 0) || (run_end == n);
    const bool single_space = run_chars == 1 && s[i] == ' ';
    if (at_edge || run_chars >= 2 || single_space) {  // a separator (or stripped)
      if (in_word) words.emplace_back(text.substr(word_start, i - word_start));
      in_word = false;
    } else if (!in_word) {  // a lone non-space whitespace char inside a word
      in_word = true;
      word_start = i;
    }
    i = run_end;
  }
  if (in_word) words.emplace_back(text.substr(word_start, n - word_start));
}

struct WerState {
  Interner ids;
  std::vector<std::string_view> words;
  std::vector<std::uint32_t> ref, hyp;
  std::vector<std::int32_t> symbol;  // by word id, -1 between uses
  std::vector<std::uint64_t> peq, pv, mv;

  void ids_of(std::string_view text, std::vector<std::uint32_t>& out) {
    jiwer_words(text, words);
    out.clear();
    for (std::string_view w : words) out.push_back(ids.intern(w));
    if (symbol.size() < ids.size()) symbol.resize(ids.size() * 2, -1);
  }
};

// Word-level Levenshtein distance (unit costs), bit-parallel over 64-row blocks (Myers'
// bit-vector algorithm in Hyyro's multi-block form): the shorter sequence is the column of
// bits; horizontal deltas carry from block to block.
std::int64_t edit_distance(WerState& st) {
  const bool ref_shorter = st.ref.size() <= st.hyp.size();
  const std::vector<std::uint32_t>& a = ref_shorter ? st.ref : st.hyp;
  const std::vector<std::uint32_t>& b = ref_shorter ? st.hyp : st.ref;
  if (a.empty()) return static_cast<std::int64_t>(b.size());
  const std::size_t m = a.size(), nb = (m + 63) / 64;
  std::int32_t nsym = 0;
  for (std::uint32_t id : a) {
    if (st.symbol[id] < 0) st.symbol[id] = nsym++;
  }
  st.peq.assign(static_cast<std::size_t>(nsym) * nb, 0);
  for (std::size_t j = 0; j < m; ++j) {
    st.peq[static_cast<std::size_t>(st.symbol[a[j]]) * nb + j / 64] |= 1ull << (j % 64);
  }
  st.pv.assign(nb, ~0ull);  // column 0: D[i][0] = i, all vertical deltas +1
  st.mv.assign(nb, 0);
  const std::uint64_t last_bit = 1ull << ((m - 1) % 64);
  std::int64_t score = static_cast<std::int64_t>(m);  // D[m][0]
  for (std::uint32_t id : b) {
    const std::int32_t s = st.symbol[id];
    const std::uint64_t* eq_col = s >= 0 ? st.peq.data() + static_cast<std::size_t>(s) * nb
                                         : nullptr;
    int hin = 1;  // row 0: D[0][j] = j
    for (std::size_t k = 0; k < nb; ++k) {
      std::uint64_t eq = eq_col ? eq_col[k] : 0;
      const std::uint64_t pv = st.pv[k], mv = st.mv[k];
      const std::uint64_t xv = eq | mv;
      if (hin < 0) eq |= 1;
      const std::uint64_t xh = (((eq & pv) + pv) ^ pv) | eq;
      std::uint64_t ph = mv | ~(xh | pv);
      std::uint64_t mh = pv & xh;
      if (k == nb - 1) score += (ph & last_bit) ? 1 : ((mh & last_bit) ? -1 : 0);
      const int hout = (ph >> 63) ? 1 : ((mh >> 63) ? -1 : 0);
      ph <<= 1;
      mh <<= 1;
      if (hin < 0) {
        mh |= 1;
      } else if (hin > 0) {
        ph |= 1;
      }
      st.pv[k] = mh | ~(xv | ph);
      st.mv[k] = ph & xv;
      hin = hout;
    }
  }
  for (std::uint32_t id : a) st.symbol[id] = -1;
  return score;
}

// Edit counts: out[2i] = word edits, out[2i+1] = reference word count.
void wer_counts(const TextBatch& refs, const TextBatch& hyps, std::int64_t* out) {
  py::gil_scoped_release release;
  parallel_for_with_state<WerState>(static_cast<std::int64_t>(refs.size()), 16,
                                    [&](WerState& st, std::int64_t i) {
                                      st.ids_of(refs.get(i), st.ref);
                                      st.ids_of(hyps.get(i), st.hyp);
                                      out[2 * i] = edit_distance(st);
                                      out[2 * i + 1] = static_cast<std::int64_t>(st.ref.size());
                                    });
}

py::array_t<std::int64_t> batch_wer_counts(const py::handle& references,
                                           const py::handle& hypotheses) {
  const TextBatch refs = extract_texts(references, "references");
  const TextBatch hyps = extract_texts(hypotheses, "hypotheses");
  check_same_length(refs, "references", hyps, "hypotheses");
  py::array_t<std::int64_t> out(
      {static_cast<py::ssize_t>(refs.size()), static_cast<py::ssize_t>(2)});
  wer_counts(refs, hyps, out.mutable_data());
  return out;
}

py::array_t<double> batch_wer(const py::handle& references, const py::handle& hypotheses) {
  const TextBatch refs = extract_texts(references, "references");
  const TextBatch hyps = extract_texts(hypotheses, "hypotheses");
  check_same_length(refs, "references", hyps, "hypotheses");
  const std::size_t n = refs.size();
  std::vector<std::int64_t> counts(2 * n);
  wer_counts(refs, hyps, counts.data());
  py::array_t<double> out(static_cast<py::ssize_t>(n));
  double* o = out.mutable_data();
  for (std::size_t i = 0; i < n; ++i) {
    o[i] = static_cast<double>(counts[2 * i]) /
           static_cast<double>(std::max<std::int64_t>(counts[2 * i + 1], 1));
  }
  return out;
}

py::list wer_tokenize(const py::handle& texts) {
  const TextBatch batch = extract_texts(texts, "texts");
  py::list out(batch.size());
  std::vector<std::string_view> words;
  for (std::size_t i = 0; i < batch.size(); ++i) {
    jiwer_words(batch.get(i), words);
    py::list item(words.size());
    for (std::size_t j = 0; j < words.size(); ++j) {
      item[j] = py::reinterpret_steal<py::object>(PyUnicode_DecodeUTF8(
          words[j].data(), static_cast<Py_ssize_t>(words[j].size()), "surrogatepass"));
    }
    out[i] = item;
  }
  return out;
}

}  // namespace

void register_wer(py::module_& m) {
  m.def("batch_wer", &batch_wer, py::arg("references"), py::arg("hypotheses"),
        "Word error rate per pair (jiwer 4.0 default transform), f64[N].");
  m.def("batch_wer_counts", &batch_wer_counts, py::arg("references"), py::arg("hypotheses"),
        "Per pair [word edit distance, reference word count], i64[N, 2].");
  m.def("wer_tokenize", &wer_tokenize, py::arg("texts"),
        "jiwer 4.0 default words of each text (list[list[str]]).");
}

}  // namespace sophiavl
