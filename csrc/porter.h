// Porter stemmer, bit-exact with nltk.stem.porter.PorterStemmer() in its default
// NLTK_EXTENSIONS mode (the mode rouge-score constructs), for ASCII words.
#pragma once

#include <string>
#include <string_view>

namespace sophiavl {

// Stems one ASCII word (A-Z are lowercased first, like nltk's to_lowercase=True).
// Non-letters (digits, punctuation) are treated as consonants, as in nltk.
std::string porter_stem(std::string_view word);

}  // namespace sophiavl
