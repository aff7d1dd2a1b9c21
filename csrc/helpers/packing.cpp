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
#include <set>
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

// Best-fit decreasing within consecutive windows: each piece, longest first (stable), goes to the
// open row with the least room that fits it (lowest row number on ties), else opens a new row.
py::tuple pack_best_fit(const Array& sizes_in, int64_t seq_length, int64_t window) {
  auto sizes = sizes_in.unchecked<1>();
  const int64_t n = sizes.shape(0);
  std::vector<int64_t> order_out, row_ptr{0};
  {
    py::gil_scoped_release release;
    order_out.reserve(static_cast<size_t>(n));
    for (int64_t lo = 0; lo < n; lo += window) {
      const int64_t hi = std::min(n, lo + window);
      std::vector<int64_t> order(static_cast<size_t>(hi - lo));
      std::iota(order.begin(), order.end(), lo);
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return sizes(a) > sizes(b); });
      std::vector<std::vector<int64_t>> rows;
      std::set<std::pair<int64_t, int64_t>> free;  // (room left, row number)
      for (int64_t p : order) {
        const int64_t need = sizes(p) + 2;
        auto it = free.lower_bound({need, -1});
        int64_t room, row;
        if (it != free.end()) {
          room = it->first;
          row = it->second;
          free.erase(it);
        } else {
          room = seq_length;
          row = static_cast<int64_t>(rows.size());
          rows.emplace_back();
        }
        rows[static_cast<size_t>(row)].push_back(p);
        if (room - need >= kMinRoom) free.insert({room - need, row});
      }
      for (const auto& r : rows) {
        order_out.insert(order_out.end(), r.begin(), r.end());
        row_ptr.push_back(static_cast<int64_t>(order_out.size()));
      }
    }
  }
  return py::make_tuple(to_array(order_out), to_array(row_ptr));
}

}  // namespace

PYBIND11_MODULE(_helpers, m) {
  m.doc() = "CPU helpers of megatron_jp (packing loops); Python fallbacks in megatron_jp/data/packing.py";
  m.def("pack_concat", &pack_concat, py::arg("lengths"), py::arg("seq_length"), py::arg("room"),
        py::arg("keep_empty"));
  m.def("pack_best_fit", &pack_best_fit, py::arg("sizes"), py::arg("seq_length"), py::arg("window"));
}
