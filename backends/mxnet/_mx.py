"""Import MXNet once, hiding only the DeprecationWarnings that mxnet 1.9.1 itself raises at import with numpy 1.23.

mxnet's ``numpy/fallback.py`` touches NumPy's removed financial functions (NEP 32), ``numpy/utils.py`` the
``np.bool`` alias, and ``numpy_dispatch_protocol.py`` distutils' ``LooseVersion``. The filters match those
messages *and* mxnet's modules only, and live inside ``catch_warnings``: nothing else is silenced and the
caller's filters are restored afterwards.
"""

import warnings

MXNET_IMPORT_WARNINGS = (
    r"In accordance with NEP 32",
    r"`np\.bool` is a deprecated alias",
    r"distutils Version classes are deprecated",
)

with warnings.catch_warnings():
    for _message in MXNET_IMPORT_WARNINGS:
        warnings.filterwarnings("ignore", message=_message, category=DeprecationWarning, module=r"mxnet(\.|$)")
    import mxnet as mx  # noqa: E402
    from mxnet import gluon, nd  # noqa: E402,F401
