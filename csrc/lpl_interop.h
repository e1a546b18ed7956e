/* Front doors from Python objects to lpl_tensor views, and the argument checks every
 * entry point shares. All functions return 0 on success and -1 with a Python
 * exception set (ValueError/TypeError naming the argument) on failure. */
#ifndef LPL_INTEROP_H
#define LPL_INTEROP_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "lpl_tensor.h"

/* Accepts a numpy.ndarray, a DLPack capsule ("dltensor" or "dltensor_versioned"), or
 * an object with __dlpack__. The capsule is borrowed, not consumed: its producer's
 * destructor still frees it, and the caller keeps `obj` alive while `out` is used.
 * `*keepalive` receives a new reference that must outlive `out` (may be NULL). */
int lpl_tensor_from_object(PyObject *obj, const char *argname, int writable,
                           lpl_tensor *out, PyObject **keepalive);

/* ndim == 4, C-contiguous; float dtype when require_float. */
int lpl_check_nchw(const lpl_tensor *t, const char *argname, int require_float);
/* Same shape as ref (names both in the message). */
int lpl_check_same_shape(const lpl_tensor *t, const char *argname, const lpl_tensor *ref,
                         const char *refname);
int lpl_check_same_device(const lpl_tensor *t, const char *argname, const lpl_tensor *ref,
                          const char *refname);
int lpl_check_dtype(const lpl_tensor *t, const char *argname, lpl_dtype want);
int lpl_check_mask_dtype(const lpl_tensor *t, const char *argname);
int lpl_check_1d(const lpl_tensor *t, const char *argname, int64_t len);
/* float64, C-contiguous, shape (planes, LPL_PM_COMPONENTS): per-plane moments (lpl_kernel_abi.h). */
int lpl_check_plane_moments(const lpl_tensor *t, const char *argname, int64_t planes);

/* Parses one of `choices` (NULL-terminated) and returns its index, -1 on error. */
int lpl_parse_choice(PyObject *obj, const char *argname, const char *const *choices);

#endif /* LPL_INTEROP_H */
