// Optional host-side helper: best-fit bin assignment for the packer's look-ahead buffer.
// O(n log n) with an ordered set of (free space, bin); the pure-Python fallback in genlip_fast/data/packing.py
// gives the same assignment (smallest sufficient free space, ties to the lowest bin index).
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <set>
#include <utility>
#include <vector>

static PyObject* best_fit(PyObject*, PyObject* args) {
  PyObject* seq;
  long capacity;
  if (!PyArg_ParseTuple(args, "Ol", &seq, &capacity)) return nullptr;
  PyObject* fast = PySequence_Fast(seq, "lengths must be a sequence of ints");
  if (!fast) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  std::set<std::pair<long, long>> open;  // (free, bin)
  long bins = 0;
  PyObject* out = PyList_New(n);
  if (!out) { Py_DECREF(fast); return nullptr; }
  for (Py_ssize_t i = 0; i < n; ++i) {
    long len = PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, i));
    if (len == -1 && PyErr_Occurred()) { Py_DECREF(fast); Py_DECREF(out); return nullptr; }
    if (len > capacity || len < 0) {
      Py_DECREF(fast); Py_DECREF(out);
      PyErr_Format(PyExc_ValueError, "item of %ld tokens does not fit the capacity %ld", len, capacity);
      return nullptr;
    }
    auto it = open.lower_bound({len, -1});
    long bin, free;
    if (it == open.end()) {
      bin = bins++;
      free = capacity;
    } else {
      bin = it->second;
      free = it->first;
      open.erase(it);
    }
    open.insert({free - len, bin});
    PyList_SET_ITEM(out, i, PyLong_FromLong(bin));
  }
  Py_DECREF(fast);
  return out;
}

static PyMethodDef methods[] = {
    {"best_fit", best_fit, METH_VARARGS, "best_fit(lengths, capacity) -> bin index per item"},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_csrc", "genlip_fast host helpers", -1, methods};

PyMODINIT_FUNC PyInit__csrc(void) { return PyModule_Create(&module); }
