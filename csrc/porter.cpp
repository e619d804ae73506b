// Porter stemmer with NLTK's extensions (nltk.stem.porter, mode NLTK_EXTENSIONS).
//
// Written from the algorithm's description (Porter 1980) plus the documented NLTK
// deviations: the irregular-forms table, the 2-letter cvc rule, -ies/-ied on 4-letter
// words, the modified y->i rule, the recursive -alli rule, -fulli and -logi in step 2,
// and "first matching suffix decides" rule lists (a matching suffix whose condition
// fails stops the rule list).
#include "porter.h"

#include <array>
#include <utility>

#include "common.h"

namespace sophiavl {
namespace {

using Word = std::string;

inline bool is_vowel_letter(char c) {
  return c == 'a' || c == 'e' || c == 'i' || c == 'o' || c == 'u';
}

// Consonant test of w[i]: 'y' is a consonant iff it starts the word or follows a vowel.
bool is_consonant(const Word& w, std::size_t i) {
  if (is_vowel_letter(w[i])) return false;
  if (w[i] != 'y') return true;
  bool negate = false;
  while (i > 0 && w[i] == 'y') {
    negate = !negate;
    --i;
  }
  return (!is_vowel_letter(w[i])) != negate;
}

// Porter's measure m of the prefix w[0:len): the number of vowel->consonant transitions.
int measure(const Word& w, std::size_t len) {
  int m = 0;
  bool prev_cons = true;
  for (std::size_t i = 0; i < len; ++i) {
    bool cons;
    if (is_vowel_letter(w[i])) {
      cons = false;
    } else if (w[i] == 'y') {
      cons = (i == 0) ? true : !prev_cons;
    } else {
      cons = true;
    }
    if (cons && i > 0 && !prev_cons) ++m;
    prev_cons = cons;
  }
  return m;
}

bool contains_vowel(const Word& w, std::size_t len) {
  for (std::size_t i = 0; i < len; ++i) {
    if (!is_consonant(w, i)) return true;
  }
  return false;
}

bool ends_double_consonant(const Word& w, std::size_t len) {
  return len >= 2 && w[len - 1] == w[len - 2] && is_consonant(w, len - 1);
}

// Condition *o (cvc, last not w/x/y), plus NLTK's 2-letter vc case.
bool ends_cvc(const Word& w, std::size_t len) {
  if (len >= 3 && is_consonant(w, len - 3) && !is_consonant(w, len - 2) &&
      is_consonant(w, len - 1)) {
    const char c = w[len - 1];
    if (c != 'w' && c != 'x' && c != 'y') return true;
  }
  return len == 2 && !is_consonant(w, 0) && is_consonant(w, 1);
}

bool ends_with(const Word& w, std::string_view suffix) {
  return w.size() >= suffix.size() &&
         std::string_view(w).substr(w.size() - suffix.size()) == suffix;
}

enum class Cond { kNone, kMGt0, kMGt1, kIon, kLogi };

struct Rule {
  std::string_view suffix;
  std::string_view replacement;
  Cond cond;
};

bool holds(Cond cond, const Word& w, std::size_t stem_len) {
  switch (cond) {
    case Cond::kNone:
      return true;
    case Cond::kMGt0:
      return measure(w, stem_len) > 0;
    case Cond::kMGt1:
      return measure(w, stem_len) > 1;
    case Cond::kIon:
      return measure(w, stem_len) > 1 && stem_len > 0 &&
             (w[stem_len - 1] == 's' || w[stem_len - 1] == 't');
    case Cond::kLogi:  // NLTK tests the word minus "ogi", not the stem minus "logi"
      return measure(w, w.size() - 3) > 0;
  }
  return false;
}

// The first rule whose suffix matches decides: replace when its condition holds,
// otherwise leave the word unchanged. Returns true when some suffix matched.
template <std::size_t K>
bool apply_rules(Word& w, const std::array<Rule, K>& rules) {
  for (const Rule& r : rules) {
    if (!ends_with(w, r.suffix)) continue;
    const std::size_t stem_len = w.size() - r.suffix.size();
    if (holds(r.cond, w, stem_len)) {
      w.resize(stem_len);
      w.append(r.replacement);
    }
    return true;
  }
  return false;
}

void step1a(Word& w) {
  if (w.size() == 4 && ends_with(w, "ies")) {  // NLTK: "ties" -> "tie"
    w.pop_back();
    return;
  }
  static const std::array<Rule, 4> rules = {{
      {"sses", "ss", Cond::kNone},
      {"ies", "i", Cond::kNone},
      {"ss", "ss", Cond::kNone},
      {"s", "", Cond::kNone},
  }};
  apply_rules(w, rules);
}

void step1b(Word& w) {
  if (ends_with(w, "ied")) {  // NLTK: "died" -> "die", "cried" -> "cri"
    const bool short_word = w.size() == 4;
    w.resize(w.size() - 3);
    w.append(short_word ? "ie" : "i");
    return;
  }
  if (ends_with(w, "eed")) {
    if (measure(w, w.size() - 3) > 0) w.pop_back();  // "eed" -> "ee"
    return;
  }
  std::size_t stem_len;
  if (ends_with(w, "ed") && contains_vowel(w, w.size() - 2)) {
    stem_len = w.size() - 2;
  } else if (ends_with(w, "ing") && contains_vowel(w, w.size() - 3)) {
    stem_len = w.size() - 3;
  } else {
    return;
  }
  w.resize(stem_len);
  if (ends_with(w, "at") || ends_with(w, "bl") || ends_with(w, "iz")) {
    w.push_back('e');
  } else if (ends_double_consonant(w, w.size())) {
    const char last = w.back();
    if (last != 'l' && last != 's' && last != 'z') w.pop_back();
  } else if (measure(w, w.size()) == 1 && ends_cvc(w, w.size())) {
    w.push_back('e');
  }
}

void step1c(Word& w) {
  // NLTK: y -> i only when preceded by a consonant that is not the first letter.
  if (!ends_with(w, "y")) return;
  const std::size_t stem_len = w.size() - 1;
  if (stem_len > 1 && is_consonant(w, stem_len - 1)) w.back() = 'i';
}

void step2(Word& w) {
  while (ends_with(w, "alli") && measure(w, w.size() - 4) > 0) {  // NLTK recursion
    w.resize(w.size() - 2);                                        // "alli" -> "al"
  }
  static const std::array<Rule, 22> rules = {{
      {"ational", "ate", Cond::kMGt0}, {"tional", "tion", Cond::kMGt0},
      {"enci", "ence", Cond::kMGt0},   {"anci", "ance", Cond::kMGt0},
      {"izer", "ize", Cond::kMGt0},    {"bli", "ble", Cond::kMGt0},
      {"alli", "al", Cond::kMGt0},     {"entli", "ent", Cond::kMGt0},
      {"eli", "e", Cond::kMGt0},       {"ousli", "ous", Cond::kMGt0},
      {"ization", "ize", Cond::kMGt0}, {"ation", "ate", Cond::kMGt0},
      {"ator", "ate", Cond::kMGt0},    {"alism", "al", Cond::kMGt0},
      {"iveness", "ive", Cond::kMGt0}, {"fulness", "ful", Cond::kMGt0},
      {"ousness", "ous", Cond::kMGt0}, {"aliti", "al", Cond::kMGt0},
      {"iviti", "ive", Cond::kMGt0},   {"biliti", "ble", Cond::kMGt0},
      {"fulli", "ful", Cond::kMGt0},   {"logi", "log", Cond::kLogi},
  }};
  apply_rules(w, rules);
}

void step3(Word& w) {
  static const std::array<Rule, 7> rules = {{
      {"icate", "ic", Cond::kMGt0},
      {"ative", "", Cond::kMGt0},
      {"alize", "al", Cond::kMGt0},
      {"iciti", "ic", Cond::kMGt0},
      {"ical", "ic", Cond::kMGt0},
      {"ful", "", Cond::kMGt0},
      {"ness", "", Cond::kMGt0},
  }};
  apply_rules(w, rules);
}

void step4(Word& w) {
  static const std::array<Rule, 19> rules = {{
      {"al", "", Cond::kMGt1},    {"ance", "", Cond::kMGt1}, {"ence", "", Cond::kMGt1},
      {"er", "", Cond::kMGt1},    {"ic", "", Cond::kMGt1},   {"able", "", Cond::kMGt1},
      {"ible", "", Cond::kMGt1},  {"ant", "", Cond::kMGt1},  {"ement", "", Cond::kMGt1},
      {"ment", "", Cond::kMGt1},  {"ent", "", Cond::kMGt1},  {"ion", "", Cond::kIon},
      {"ou", "", Cond::kMGt1},    {"ism", "", Cond::kMGt1},  {"ate", "", Cond::kMGt1},
      {"iti", "", Cond::kMGt1},   {"ous", "", Cond::kMGt1},  {"ive", "", Cond::kMGt1},
      {"ize", "", Cond::kMGt1},
  }};
  apply_rules(w, rules);
}

void step5a(Word& w) {
  if (!ends_with(w, "e")) return;
  const std::size_t stem_len = w.size() - 1;
  const int m = measure(w, stem_len);
  if (m > 1 || (m == 1 && !ends_cvc(w, stem_len))) w.pop_back();
}

void step5b(Word& w) {
  // (m > 1 and *d and *L) -> single letter; NLTK measures the word minus one 'l'.
  if (ends_with(w, "ll") && measure(w, w.size() - 1) > 1) w.pop_back();
}

// NLTK_EXTENSIONS irregular forms: exact (lowercased) word -> stem.
const std::string_view* irregular_form(const Word& w) {
  static const std::array<std::pair<std::string_view, std::string_view>, 16> pool = {{
      {"sky", "sky"},
      {"skies", "sky"},
      {"dying", "die"},
      {"lying", "lie"},
      {"tying", "tie"},
      {"news", "news"},
      {"innings", "inning"},
      {"inning", "inning"},
      {"outings", "outing"},
      {"outing", "outing"},
      {"cannings", "canning"},
      {"canning", "canning"},
      {"howe", "howe"},
      {"proceed", "proceed"},
      {"exceed", "exceed"},
      {"succeed", "succeed"},
  }};
  for (const auto& kv : pool) {
    if (kv.first == w) return &kv.second;
  }
  return nullptr;
}

}  // namespace

std::string porter_stem(std::string_view word) {
  Word w(word);
  for (char& c : w) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  if (const std::string_view* irregular = irregular_form(w)) return std::string(*irregular);
  if (w.size() <= 2) return w;
  step1a(w);
  step1b(w);
  step1c(w);
  step2(w);
  step3(w);
  step4(w);
  step5a(w);
  step5b(w);
  return w;
}

namespace {

py::list porter_stem_list(const py::handle& words) {
  TextBatch batch = extract_texts(words, "words");
  for (std::size_t i = 0; i < batch.size(); ++i) {
    for (unsigned char c : batch.get(i)) {
      if (c >= 0x80) {
        throw std::invalid_argument("words[" + std::to_string(i) +
                                    "] is not ASCII; porter_stem accepts ASCII words only");
      }
    }
  }
  std::vector<std::string> stems(batch.size());
  {
    py::gil_scoped_release release;
    parallel_for_dynamic(static_cast<std::int64_t>(batch.size()), 256,
                         [&](std::int64_t i) { stems[i] = porter_stem(batch.get(i)); });
  }
  py::list out(stems.size());
  for (std::size_t i = 0; i < stems.size(); ++i) out[i] = py::str(stems[i]);
  return out;
}

}  // namespace

void register_porter(py::module_& m) {
  m.def("porter_stem", &porter_stem_list, py::arg("words"),
        "Porter stems (NLTK_EXTENSIONS mode) of a list of ASCII words.");
}

}  // namespace sophiavl
