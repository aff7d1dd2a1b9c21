// Word-start flags from MeCab's -Owakati output in one pass, and token character spans from
// SentencePiece piece lengths (module megatron_jp._helpers).
//
// Mirrors megatron_jp/data/segment.py exactly: `MecabSegmenter._align` (surfaces are laid over the
// characters MeCab does not skip, " \t\n\v"; a morpheme spans from its first to its last character)
// and `word_start_flags` (a token starts a word unless its first morpheme is the previous token's
// last one). The numpy version builds a dozen arrays per document and Python strings per morpheme;
// this one walks the text once. Returns None where the surfaces do not cover the text (MeCab
// changed it): the Python slow path then searches each surface.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

using Offsets = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using Ids = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

bool skipped_by_mecab(char32_t c) { return c == U' ' || c == U'\t' || c == U'\n' || c == U'\v'; }

// owner[c]: the morpheme covering character c, -1 for none (size n + 1: a sentinel at n).
bool morpheme_owners(const std::u32string& text, const std::u32string& parsed, std::vector<int64_t>* owner) {
  const int64_t n = static_cast<int64_t>(text.size());
  owner->assign(static_cast<size_t>(n + 1), -1);
  int64_t p = 0, m = -1, first = -1, last = -1;
  auto close = [&]() {
    for (int64_t c = first; m >= 0 && c <= last; ++c) (*owner)[static_cast<size_t>(c)] = m;
  };
  bool in_word = false;
  for (char32_t c : parsed) {
    if (c == U' ' || c == U'\n') {
      in_word = false;
      continue;
    }
    if (!in_word) {
      close();
      ++m;
      in_word = true;
      first = -1;
    }
    while (p < n && skipped_by_mecab(text[static_cast<size_t>(p)])) ++p;
    if (p >= n) return false;
    if (first < 0) first = p;
    last = p++;
  }
  close();
  while (p < n && skipped_by_mecab(text[static_cast<size_t>(p)])) ++p;
  return p == n;
}

// flags[t] = 1 where token t starts a word unit (see the file comment); owner as morpheme_owners.
template <typename Starts>
void fill_flags(const std::vector<int64_t>& owner, const Starts& starts, const Starts& ends, int64_t n,
                std::vector<uint8_t>* flags) {
  std::vector<int64_t> nxt(static_cast<size_t>(n + 1)), prv(static_cast<size_t>(n + 1));
  nxt[static_cast<size_t>(n)] = n;  // first covered character at or after i (n: none)
  for (int64_t i = n - 1; i >= 0; --i) nxt[i] = owner[i] >= 0 ? i : nxt[i + 1];
  int64_t seen = -1;  // last covered character at or before i (-1: none)
  for (int64_t i = 0; i < n; ++i) prv[i] = seen = owner[i] >= 0 ? i : seen;
  prv[static_cast<size_t>(n)] = seen;
  int64_t prev_last = -1;
  for (py::ssize_t t = 0; t < starts.shape(0); ++t) {
    const int64_t s = std::min(starts(t), n);
    // Empty spans (byte-fallback pieces before the one carrying the character) own the next one.
    const int64_t e = std::max(ends(t), std::min(s + 1, n));
    const int64_t first = nxt[s] < e ? owner[nxt[s]] : -1;
    const int64_t last_pos = prv[std::max<int64_t>(e - 1, 0)];
    const int64_t last = (last_pos >= s && e > s) ? owner[std::max<int64_t>(last_pos, 0)] : -1;
    if (t > 0) (*flags)[t] = first < 0 || first != prev_last;
    prev_last = last;
  }
}

py::object wakati_word_flags(const std::u32string& text, const std::u32string& parsed, const Offsets& tok_starts,
                             const Offsets& tok_ends) {
  auto starts = tok_starts.unchecked<1>();
  auto ends = tok_ends.unchecked<1>();
  const int64_t n = static_cast<int64_t>(text.size());
  std::vector<int64_t> owner;
  std::vector<uint8_t> flags(static_cast<size_t>(starts.shape(0)), 1);
  bool covered;
  {
    py::gil_scoped_release release;
    covered = morpheme_owners(text, parsed, &owner);
    if (covered) fill_flags(owner, starts, ends, n, &flags);
  }
  if (!covered) return py::none();
  py::array_t<uint8_t> out(static_cast<py::ssize_t>(flags.size()));
  std::copy(flags.begin(), flags.end(), out.mutable_data());
  return std::move(out);
}

// A byte position in UTF-8 text and the number of characters begun before it.
struct CharCursor {
  const uint8_t* raw;
  int64_t n;
  int64_t pos = 0, chars = 0;

  void step() { chars += (raw[pos++] & 0xC0) != 0x80; }
  void advance_to(int64_t target) {
    while (pos < target) step();
  }
  // a position inside a character (a continuation byte) belongs to that character
  int64_t char_at(int64_t p) const { return (p < n && (raw[p] & 0xC0) == 0x80) ? chars - 1 : chars; }
};

// Character spans, in the normalized text, of consecutive pieces of the given UTF-8 byte lengths
// (SentencePieceTokenizer._offsets_from_pieces has the numpy version and the rules). None when the
// lengths do not add up to the text or a piece has no known length (-1).
py::object piece_spans(const py::bytes& normalized, const Ids& ids, const Offsets& piece_bytes) {
  CharCursor at{reinterpret_cast<const uint8_t*>(PyBytes_AS_STRING(normalized.ptr())),
                PyBytes_GET_SIZE(normalized.ptr())};
  auto id = ids.unchecked<1>();
  auto table = piece_bytes.unchecked<1>();
  const py::ssize_t n_tok = id.shape(0);
  py::array_t<int64_t> starts(n_tok), ends(n_tok);
  int64_t* s = starts.mutable_data();
  int64_t* e = ends.mutable_data();
  for (py::ssize_t t = 0; t < n_tok; ++t) {
    const int32_t piece = id(t);
    const int64_t len = (piece >= 0 && piece < table.shape(0)) ? table(piece) : -1;
    if (len < 0 || at.pos + len > at.n) return py::none();
    s[t] = at.char_at(at.pos);
    at.advance_to(at.pos + len);
    e[t] = at.char_at(at.pos);
  }
  if (at.pos != at.n) return py::none();
  return py::make_tuple(starts, ends);
}

// Character spans of the pieces in the original text, where the pieces spell it out byte for byte
// (the normalizer changed nothing; "\u2581" in a piece matches a space): SentencePiece's own
// offsets without calling its normalizer. None as soon as a piece differs from the text: the
// caller then maps through the normalizer's offsets. Pieces are `blob[start[i]:start[i + 1]]`
// (byte pieces: their one byte), `known[i]` is false for unknown and control pieces.
py::object text_piece_spans(const py::bytes& text, const Ids& ids, const py::array_t<uint8_t, py::array::c_style>& blob,
                            const Offsets& start,
                            const py::array_t<bool, py::array::c_style>& known) {
  CharCursor at{reinterpret_cast<const uint8_t*>(PyBytes_AS_STRING(text.ptr())), PyBytes_GET_SIZE(text.ptr())};
  auto id = ids.unchecked<1>();
  auto bytes = blob.unchecked<1>();
  auto first = start.unchecked<1>();
  auto ok = known.unchecked<1>();
  const py::ssize_t n_tok = id.shape(0);
  py::array_t<int64_t> starts(n_tok), ends(n_tok);
  int64_t* s = starts.mutable_data();
  int64_t* e = ends.mutable_data();
  for (py::ssize_t t = 0; t < n_tok; ++t) {
    const int32_t piece = id(t);
    if (piece < 0 || piece >= ok.shape(0) || !ok(piece)) return py::none();
    s[t] = at.char_at(at.pos);
    for (int64_t k = first(piece), stop = first(piece + 1); k < stop;) {
      const bool space = k + 2 < stop && bytes(k) == 0xE2 && bytes(k + 1) == 0x96 && bytes(k + 2) == 0x81 &&
                         at.pos < at.n && at.raw[at.pos] == ' ';
      if (space) {
        at.step();
        k += 3;
        continue;
      }
      if (at.pos >= at.n || at.raw[at.pos] != bytes(k)) return py::none();
      at.step();
      ++k;
    }
    e[t] = at.char_at(at.pos);
  }
  if (at.pos != at.n) return py::none();
  return py::make_tuple(starts, ends);
}

}  // namespace

void register_words(py::module_& m) {
  m.def("text_piece_spans", &text_piece_spans, py::arg("text"), py::arg("ids"), py::arg("blob"), py::arg("start"),
        py::arg("known"));
  m.def("piece_spans", &piece_spans, py::arg("normalized"), py::arg("ids"), py::arg("piece_bytes"));
  m.def("wakati_word_flags", &wakati_word_flags, py::arg("text"), py::arg("parsed"), py::arg("tok_starts"),
        py::arg("tok_ends"));
}
