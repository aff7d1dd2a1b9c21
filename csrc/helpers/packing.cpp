// Sequential loops of megatron_jp/data/packing.py in C++ (module megatron_jp._helpers).
//
// Both functions mirror the Python fallbacks `_concat_python` and `_best_fit_python` exactly,
// including tie-breaking, so a run gives the same rows with or without the extension.
// A piece costs its length + 2 slots ([CLS] ... [SEP]); a row with fewer than 3 free slots is closed.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <functional>
#include <utility>
#include <vector>

namespace py = pybind11;
using Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

namespace {

constexpr int64_t kMinRoom = 3;

Array to_array(const std::vector<int64_t>& v) {
  Array out(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

// Documents back to back; a document continues in the next row when the current one is full.
// Streams: `room` is what the open row (carried from the previous call) has left; returns the pieces
// (source position, start, size), `row_ends` (the number of pieces of this call emitted before each
// row that closed during it) and the room left in the row that is still open. A zero-token document
// becomes one empty piece when keep_empty, and vanishes otherwise.
py::tuple pack_concat(const Array& lengths, int64_t seq_length, int64_t room, bool keep_empty) {
  auto len = lengths.unchecked<1>();
  std::vector<int64_t> src, starts, sizes, row_ends;
  {
    py::gil_scoped_release release;
    for (py::ssize_t i = 0; i < len.shape(0); ++i) {
      bool first = keep_empty && len(i) == 0;
      for (int64_t start = 0; start < len(i) || first; first = false) {
        if (room < kMinRoom) {
          row_ends.push_back(static_cast<int64_t>(src.size()));
          room = seq_length;
        }
        const int64_t take = std::min(len(i) - start, room - 2);
        src.push_back(i);
        starts.push_back(start);
        sizes.push_back(take);
        room -= take + 2;
        start += take;
      }
    }
  }
  return py::make_tuple(to_array(src), to_array(starts), to_array(sizes), to_array(row_ends), room);
}

// Open rows of one best-fit window by room left: bucket r holds (as a min-heap) the row numbers with
// r free slots, and a bitset marks the non-empty buckets, so "the least room >= need, lowest row on
// ties" is a scan of a few 64-bit words instead of a search in a std::set (whose node allocations
// made it the slowest step of building a large index).
class FreeRows {
 public:
  explicit FreeRows(int64_t seq_length)
      : heaps_(static_cast<size_t>(seq_length + 1)), bits_(static_cast<size_t>(seq_length / 64 + 1), 0) {}

  // Pops the row with the least room >= need (lowest row number on ties); false if none.
  bool take(int64_t need, int64_t* room, int64_t* row) {
    for (size_t w = static_cast<size_t>(need / 64); w < bits_.size(); ++w) {
      uint64_t word = bits_[w];
      if (w == static_cast<size_t>(need / 64)) word &= ~uint64_t{0} << (need % 64);
      if (!word) continue;
      *room = static_cast<int64_t>(w * 64 + __builtin_ctzll(word));
      auto& heap = heaps_[static_cast<size_t>(*room)];
      std::pop_heap(heap.begin(), heap.end(), std::greater<>());
      *row = heap.back();
      heap.pop_back();
      if (heap.empty()) bits_[w] &= ~(uint64_t{1} << (*room % 64));
      return true;
    }
    return false;
  }

  void put(int64_t room, int64_t row) {
    auto& heap = heaps_[static_cast<size_t>(room)];
    heap.push_back(row);
    std::push_heap(heap.begin(), heap.end(), std::greater<>());
    bits_[static_cast<size_t>(room / 64)] |= uint64_t{1} << (room % 64);
  }

  void clear() {
    for (auto& h : heaps_) h.clear();
    std::fill(bits_.begin(), bits_.end(), 0);
  }

 private:
  std::vector<std::vector<int64_t>> heaps_;
  std::vector<uint64_t> bits_;
};

// Best-fit decreasing within consecutive windows: each piece, longest first (stable), goes to the
// open row with the least room that fits it (lowest row number on ties), else opens a new row.
// Pieces are at most seq_length - 2 long, so the stable descending sort is a counting sort.
py::tuple pack_best_fit(const Array& sizes_in, int64_t seq_length, int64_t window) {
  auto sizes = sizes_in.unchecked<1>();
  const int64_t n = sizes.shape(0);
  std::vector<int64_t> order_out, row_ptr{0};
  {
    py::gil_scoped_release release;
    order_out.reserve(static_cast<size_t>(n));
    FreeRows free(seq_length);
    std::vector<int64_t> count(static_cast<size_t>(seq_length + 2)), order, row_of, row_start, row_fill;
    for (int64_t lo = 0; lo < n; lo += window) {
      const int64_t hi = std::min(n, lo + window);
      std::fill(count.begin(), count.end(), 0);
      for (int64_t p = lo; p < hi; ++p) ++count[static_cast<size_t>(seq_length - std::min(sizes(p), seq_length))];
      for (size_t k = 1; k < count.size(); ++k) count[k] += count[k - 1];  // end of each size's range
      order.assign(static_cast<size_t>(hi - lo), 0);
      for (int64_t p = hi - 1; p >= lo; --p)
        order[static_cast<size_t>(--count[static_cast<size_t>(seq_length - std::min(sizes(p), seq_length))])] = p;
      free.clear();
      row_of.assign(static_cast<size_t>(hi - lo), 0);
      row_fill.clear();
      for (int64_t p : order) {
        const int64_t need = sizes(p) + 2;
        int64_t room, row;
        if (!free.take(need, &room, &row)) {
          room = seq_length;
          row = static_cast<int64_t>(row_fill.size());
          row_fill.push_back(0);
        }
        row_of[static_cast<size_t>(p - lo)] = row;
        ++row_fill[static_cast<size_t>(row)];
        if (room - need >= kMinRoom) free.put(room - need, row);
      }
      // Pieces grouped by row, each row's pieces in the order they were placed.
      row_start.assign(row_fill.size() + 1, 0);
      for (size_t r = 0; r < row_fill.size(); ++r) row_start[r + 1] = row_start[r] + row_fill[r];
      const size_t base = order_out.size();
      order_out.resize(base + static_cast<size_t>(hi - lo));
      for (int64_t p : order) order_out[base + static_cast<size_t>(row_start[row_of[p - lo]]++)] = p;
      for (size_t r = 0; r < row_fill.size(); ++r) row_ptr.push_back(static_cast<int64_t>(base) + row_start[r]);
    }
  }
  return py::make_tuple(to_array(order_out), to_array(row_ptr));
}

}  // namespace

void register_words(py::module_& m);  // words.cpp

PYBIND11_MODULE(_helpers, m) {
  m.doc() = "CPU helpers of megatron_jp (packing loops, word flags); Python fallbacks in megatron_jp/data/";
  register_words(m);
  m.def("pack_concat", &pack_concat, py::arg("lengths"), py::arg("seq_length"), py::arg("room"),
        py::arg("keep_empty"));
  m.def("pack_best_fit", &pack_best_fit, py::arg("sizes"), py::arg("seq_length"), py::arg("window"));
}
