"""Packaging: one import namespace, ``doconv``, assembled from the top-level folders.

``core/`` is ``doconv`` (NumPy only), the backends are ``doconv.torch``, ``doconv.tf`` and
``doconv.mxnet``, ``parity/`` is ``doconv.parity`` and ``experiments/`` is ``doconv.experiments``. Only ``package_dir`` maps them: nothing
puts ``backends/`` itself on ``sys.path`` (its ``torch`` folder would shadow the real torch).
"""

from setuptools import setup

PACKAGES = {
    "doconv": "core",
    "doconv.torch": "backends/torch",
    "doconv.tf": "backends/tf",
    "doconv.mxnet": "backends/mxnet",
    "doconv.parity": "parity",
    "doconv.experiments": "experiments",
}

setup(
    name="doconv",
    version="0.1.0",
    description="DO-Conv (depthwise over-parameterized convolution): NumPy specification and "
                "PyTorch / Keras 3 / MXNet Gluon layers with cross-framework parity",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    install_requires=["numpy>=1.21", "safetensors>=0.4"],
    extras_require={
        "torch": ["torch>=2.1"],
        "tf": ["tensorflow>=2.16", "keras>=3.0"],
        "tf-cpu": ["tensorflow-cpu>=2.16", "keras>=3.0"],
        "jax": ["jax>=0.4.26", "keras>=3.0"],  # doconv.tf on KERAS_BACKEND=jax, no TensorFlow needed
        "mxnet": ["mxnet>=1.9.1,<2", "gluoncv>=0.10", "numpy<1.24"],
        "export": ["onnx>=1.15", "onnxruntime>=1.17", "onnxscript>=0.1"],
        "parity": ["rich>=13"],
        "experiments": ["torch>=2.1", "scikit-learn>=1.2", "matplotlib>=3.6", "tqdm>=4.60"],
        "test": ["pytest>=7", "hypothesis>=6", "rich>=13"],
    },
    entry_points={"console_scripts": [
        "doconv-parity = doconv.parity.__main__:main",
        "doconv-experiment = doconv.experiments.__main__:main",
    ]},
)
