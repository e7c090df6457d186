// Optional host-side helper for the packer: which open pack a sample fills most tightly (best fit).
// The pure-Python fallback in genlip_fast/data/packing.py gives the same answer (smallest room that still fits,
// ties to the lowest index); this one avoids boxing every comparison when the look-ahead holds many packs.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject* tightest_bin(PyObject*, PyObject* args) {
  PyObject* seq;
  long n, capacity;
  if (!PyArg_ParseTuple(args, "Oll", &seq, &n, &capacity)) return nullptr;
  PyObject* fast = PySequence_Fast(seq, "used must be a sequence of ints");
  if (!fast) return nullptr;
  const Py_ssize_t bins = PySequence_Fast_GET_SIZE(fast);
  PyObject** items = PySequence_Fast_ITEMS(fast);
  long best = -1, best_room = capacity + 1;
  for (Py_ssize_t i = 0; i < bins; ++i) {
    long used = PyLong_AsLong(items[i]);
    if (used == -1 && PyErr_Occurred()) { Py_DECREF(fast); return nullptr; }
    long room = capacity - used;
    if (n <= room && room < best_room) {
      best = static_cast<long>(i);
      best_room = room;
    }
  }
  Py_DECREF(fast);
  return PyLong_FromLong(best);
}

static PyMethodDef methods[] = {
    {"tightest_bin", tightest_bin, METH_VARARGS,
     "tightest_bin(used, n, capacity) -> index of the pack with the least room >= n, or -1"},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_csrc", "genlip_fast host helpers", -1, methods};

PyMODINIT_FUNC PyInit__csrc(void) { return PyModule_Create(&module); }
