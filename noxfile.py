"""Environments and sessions. ``nox -t tests`` runs the whole test suite; ``nox -s parity`` the main job.

Two environments, because MXNet/GluonCV cannot share one with torch 2 and numpy 2:
"modern" (torch, TensorFlow/Keras 3, numpy 2) and "mxnet" (mxnet 1.9.1, gluoncv, numpy<1.24).
Installs go through pip with a constraints file (also exported as PIP_CONSTRAINT so isolated build
environments obey it); nox's default virtualenv backend is used because uv ignores pip's
configuration and would fetch CUDA torch.
"""

import os

import nox

nox.options.default_venv_backend = "virtualenv"
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True

PYTHON = "3.11"
HERE = os.path.dirname(os.path.abspath(__file__))
MODERN = os.path.join(HERE, "constraints", "modern.txt")
MXNET = os.path.join(HERE, "constraints", "mxnet.txt")


def install(session, constraints, *args):
    session.install("-c", constraints, *args, env={"PIP_CONSTRAINT": constraints})


@nox.session(python=PYTHON, tags=["tests"])
def tests(session):
    """Core, PyTorch, Keras and parity tests in the modern environment (installed with ``pip install .``)."""
    install(session, MODERN, ".[torch,tf-cpu,test]")
    session.run("pytest", "tests", "--ignore=tests/backend_mxnet", *session.posargs)


@nox.session(name="tests-mxnet", python=PYTHON, tags=["tests"])
def tests_mxnet(session):
    """Core and MXNet/GluonCV tests in the MXNet environment (numpy<1.24, no torch)."""
    install(session, MXNET, ".[mxnet,test]")
    session.run("pytest", "tests/core", "tests/backend_mxnet", *session.posargs)


@nox.session(name="install-check", python=PYTHON, tags=["tests"])
@nox.parametrize("editable", [False, True], ids=["wheel", "editable"])
def install_check(session, editable):
    """``pip install .`` and ``pip install -e .`` both map every folder into ``doconv.*``."""
    install(session, MODERN, *(["-e", "."] if editable else ["."]), "pytest")
    session.chdir(session.create_tmp())  # away from the checkout: only the installed mapping counts
    session.run("python", os.path.join(HERE, "tests", "install_check.py"), HERE, "editable" if editable else "wheel")


@nox.session(python=PYTHON)
def parity(session):
    """The main job: the DO-Conv self-check / parity report."""
    install(session, MODERN, ".[parity]")
    session.run("python", "-m", "doconv", *session.posargs)
