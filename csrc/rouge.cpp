// ROUGE-1 / ROUGE-2 / ROUGE-L F-measures, equal to
// rouge_score.rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rougeL'], use_stemmer=True)
// .score(target=reference, prediction=hypothesis).
//
// Tokenizer (rouge_score.tokenize with the Porter stemmer): Python str.lower(), every
// character outside [a-z0-9] is a separator, tokens longer than 3 characters are
// Porter-stemmed (NLTK_EXTENSIONS mode), empty results are dropped. On UTF-8 bytes:
// ASCII A-Z lowercase to a-z; the only non-ASCII code points whose str.lower() contains
// [a-z0-9] are U+212A KELVIN SIGN (-> "k") and U+0130 (-> "i" + U+0307, a separator);
// every other non-ASCII byte is a separator.
//
// Stems are cached per thread (each distinct word is stemmed once per thread and call);
// token ids are per-thread dense ids of the final (stemmed) strings, so one pair, scored
// by one thread, compares ids consistently.
#include <algorithm>

#include "common.h"
#include "interner.h"
#include "porter.h"

namespace sophiavl {
namespace {

constexpr std::uint32_t kDropped = 0xFFFFFFFFu;

// Byte -> lowercase [a-z0-9] character, or 0 for a separator byte (all bytes >= 0x80
// included; the two multi-byte exceptions are handled in rouge_split).
struct ByteClass {
  char to_token[256];
  ByteClass() : to_token{} {
    for (int c = '0'; c <= '9'; ++c) to_token[c] = static_cast<char>(c);
    for (int c = 'a'; c <= 'z'; ++c) to_token[c] = static_cast<char>(c);
    for (int c = 'A'; c <= 'Z'; ++c) to_token[c] = static_cast<char>(c - 'A' + 'a');
  }
};
const ByteClass kByteClass;

// Writes the rouge tokens of `text` into buf, recording [begin, end) ranges in spans.
void rouge_split(std::string_view text, std::string& buf,
                 std::vector<std::pair<std::uint32_t, std::uint32_t>>& spans) {
  buf.resize(text.size());  // output never longer than input
  spans.clear();
  char* out = buf.data();
  std::uint32_t len = 0, start = 0;
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const std::size_t n = text.size();
  for (std::size_t i = 0; i < n; ++i) {
    const unsigned char c = s[i];
    const char t = kByteClass.to_token[c];
    if (t != 0) {
      out[len++] = t;
      continue;
    }
    bool ends_token = true;
    if (c == 0xE2 && i + 2 < n && s[i + 1] == 0x84 && s[i + 2] == 0xAA) {
      out[len++] = 'k';  // U+212A KELVIN SIGN lowercases to ASCII 'k'
      i += 2;
      ends_token = false;
    } else if (c == 0xC4 && i + 1 < n && s[i + 1] == 0xB0) {
      out[len++] = 'i';  // U+0130 lowercases to 'i' + U+0307 (a separator)
      i += 1;
    }
    if (ends_token) {
      if (len > start) spans.emplace_back(start, len);
      start = len;
    }
  }
  if (len > start) spans.emplace_back(start, len);
}

struct RougeState {
  Interner word_to_id;   // raw token -> id of its final (stemmed) form, or kDropped
  Interner final_to_id;  // final string -> dense id
  std::string buf;
  std::vector<std::pair<std::uint32_t, std::uint32_t>> spans;
  std::vector<std::uint32_t> ref_ids, hyp_ids;
  std::vector<std::uint64_t> keys;  // bigram table: key + 1, 0 = empty
  std::vector<std::int32_t> key_counts;
  std::vector<std::int32_t> counts;  // by id, all zero between uses
  std::vector<std::int32_t> symbol;  // by id, -1 between uses
  std::vector<std::uint64_t> masks, v;

  void ids_of(std::string_view text, std::vector<std::uint32_t>& ids) {
    rouge_split(text, buf, spans);
    ids.clear();
    for (const auto& sp : spans) {
      const std::string_view tok(buf.data() + sp.first, sp.second - sp.first);
      const std::uint32_t id = word_to_id.find_or_insert(tok, [&]() -> std::uint32_t {
        if (tok.size() <= 3) return final_to_id.intern(tok);
        const std::string stem = porter_stem(tok);
        return stem.empty() ? kDropped : final_to_id.intern(stem);
      });
      if (id != kDropped) ids.push_back(id);
    }
    if (counts.size() < final_to_id.size()) {
      counts.resize(final_to_id.size() * 2, 0);
      symbol.resize(final_to_id.size() * 2, -1);
    }
  }
};

// Multiset intersection size of unigrams.
std::int64_t unigram_overlap(RougeState& st) {
  for (std::uint32_t id : st.ref_ids) ++st.counts[id];
  std::int64_t hits = 0;
  for (std::uint32_t id : st.hyp_ids) {
    if (st.counts[id] > 0) {
      --st.counts[id];
      ++hits;
    }
  }
  for (std::uint32_t id : st.ref_ids) st.counts[id] = 0;
  return hits;
}

// Multiset intersection size of bigrams, through a small open-addressing count table.
std::int64_t bigram_overlap(RougeState& st) {
  const std::vector<std::uint32_t>& a = st.ref_ids;
  const std::vector<std::uint32_t>& b = st.hyp_ids;
  if (a.size() < 2 || b.size() < 2) return 0;
  std::size_t cap = 64;
  while (cap < 2 * a.size()) cap *= 2;
  st.keys.assign(cap, 0);
  st.key_counts.assign(cap, 0);
  const std::size_t mask = cap - 1;
  auto slot_of = [&](std::uint64_t key) {  // key + 1 != 0 marks an occupied slot
    std::size_t pos = static_cast<std::size_t>((key * 0x9E3779B97F4A7C15ull) >> 20) & mask;
    while (st.keys[pos] != 0 && st.keys[pos] != key + 1) pos = (pos + 1) & mask;
    return pos;
  };
  for (std::size_t i = 0; i + 1 < a.size(); ++i) {
    const std::uint64_t key = (static_cast<std::uint64_t>(a[i]) << 32) | a[i + 1];
    const std::size_t pos = slot_of(key);
    st.keys[pos] = key + 1;
    ++st.key_counts[pos];
  }
  std::int64_t hits = 0;
  for (std::size_t i = 0; i + 1 < b.size(); ++i) {
    const std::uint64_t key = (static_cast<std::uint64_t>(b[i]) << 32) | b[i + 1];
    const std::size_t pos = slot_of(key);
    if (st.keys[pos] != 0 && st.key_counts[pos] > 0) {
      --st.key_counts[pos];
      ++hits;
    }
  }
  return hits;
}

// Length of the longest common subsequence, bit-parallel (Allison-Dix / Hyyro):
// the shorter sequence is the bit vector, V <- (V + (V & M[y])) | (V - (V & M[y])).
std::int64_t lcs_length(RougeState& st) {
  const std::vector<std::uint32_t>& a =
      st.ref_ids.size() <= st.hyp_ids.size() ? st.ref_ids : st.hyp_ids;
  const std::vector<std::uint32_t>& b =
      st.ref_ids.size() <= st.hyp_ids.size() ? st.hyp_ids : st.ref_ids;
  if (a.empty()) return 0;
  const std::size_t nb = (a.size() + 63) / 64;
  std::int32_t nsym = 0;
  for (std::uint32_t id : a) {
    if (st.symbol[id] < 0) st.symbol[id] = nsym++;
  }
  st.masks.assign(static_cast<std::size_t>(nsym) * nb, 0);
  for (std::size_t j = 0; j < a.size(); ++j) {
    st.masks[static_cast<std::size_t>(st.symbol[a[j]]) * nb + j / 64] |= 1ull << (j % 64);
  }
  st.v.assign(nb, ~0ull);
  std::uint64_t* v = st.v.data();
  for (std::uint32_t id : b) {
    const std::int32_t s = st.symbol[id];
    if (s < 0) continue;  // no match: V is unchanged
    const std::uint64_t* m = st.masks.data() + static_cast<std::size_t>(s) * nb;
    std::uint64_t carry = 0;
    for (std::size_t k = 0; k < nb; ++k) {
      const std::uint64_t old = v[k];
      const std::uint64_t u = old & m[k];
      const std::uint64_t x = old + u;
      const std::uint64_t c1 = x < old;
      const std::uint64_t y = x + carry;
      const std::uint64_t c2 = y < x;
      v[k] = y | (old - u);
      carry = c1 | c2;
    }
  }
  std::int64_t ones = 0;
  for (std::size_t k = 0; k < nb; ++k) ones += __builtin_popcountll(v[k]);
  for (std::uint32_t id : a) st.symbol[id] = -1;
  return static_cast<std::int64_t>(nb * 64) - ones;
}

// rouge_score.scoring.fmeasure with rouge_score's precision / recall conventions.
inline double f_measure(std::int64_t hits, std::int64_t n_pred, std::int64_t n_target) {
  const double p = static_cast<double>(hits) / static_cast<double>(std::max<std::int64_t>(n_pred, 1));
  const double r =
      static_cast<double>(hits) / static_cast<double>(std::max<std::int64_t>(n_target, 1));
  return p + r > 0 ? 2 * p * r / (p + r) : 0.0;
}

void score_pair(RougeState& st, std::string_view ref, std::string_view hyp, double* out) {
  st.ids_of(ref, st.ref_ids);
  st.ids_of(hyp, st.hyp_ids);
  const auto nt = static_cast<std::int64_t>(st.ref_ids.size());
  const auto np = static_cast<std::int64_t>(st.hyp_ids.size());
  out[0] = f_measure(unigram_overlap(st), np, nt);
  out[1] = f_measure(bigram_overlap(st), std::max<std::int64_t>(np - 1, 0),
                     std::max<std::int64_t>(nt - 1, 0));
  out[2] = (nt == 0 || np == 0) ? 0.0 : f_measure(lcs_length(st), np, nt);
}

py::array_t<double> batch_rouge(const py::handle& references, const py::handle& hypotheses) {
  const TextBatch refs = extract_texts(references, "references");
  const TextBatch hyps = extract_texts(hypotheses, "hypotheses");
  check_same_length(refs, "references", hyps, "hypotheses");
  const auto n = static_cast<py::ssize_t>(refs.size());
  py::array_t<double> out({n, static_cast<py::ssize_t>(3)});
  double* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    parallel_for_with_state<RougeState>(n, 16, [&](RougeState& st, std::int64_t i) {
      score_pair(st, refs.get(i), hyps.get(i), o + 3 * i);
    });
  }
  return out;
}

py::list rouge_tokenize(const py::handle& texts) {
  const TextBatch batch = extract_texts(texts, "texts");
  std::vector<std::vector<std::string>> tokens(batch.size());
  {
    py::gil_scoped_release release;
    parallel_for_with_state<RougeState>(
        static_cast<std::int64_t>(batch.size()), 16, [&](RougeState& st, std::int64_t i) {
          rouge_split(batch.get(i), st.buf, st.spans);
          for (const auto& sp : st.spans) {
            const std::string_view tok(st.buf.data() + sp.first, sp.second - sp.first);
            std::string final_tok = tok.size() > 3 ? porter_stem(tok) : std::string(tok);
            if (!final_tok.empty()) tokens[i].push_back(std::move(final_tok));
          }
        });
  }
  py::list out(tokens.size());
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    py::list item(tokens[i].size());
    for (std::size_t j = 0; j < tokens[i].size(); ++j) item[j] = py::str(tokens[i][j]);
    out[i] = item;
  }
  return out;
}

}  // namespace

void register_rouge(py::module_& m) {
  m.def("batch_rouge", &batch_rouge, py::arg("references"), py::arg("hypotheses"),
        "F-measures of ROUGE-1, ROUGE-2, ROUGE-L (rouge-score, use_stemmer=True), f64[N, 3].");
  m.def("rouge_tokenize", &rouge_tokenize, py::arg("texts"),
        "rouge-score's default tokens (lowercase, [a-z0-9] runs, Porter stems), per text.");
}

}  // namespace sophiavl
