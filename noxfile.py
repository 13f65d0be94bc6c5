"""Environments and sessions. ``nox -t tests`` runs the whole test suite; ``nox -s parity`` the main job.

Two environments, because MXNet/GluonCV cannot share one with torch 2 and numpy 2:
"modern" (torch, TensorFlow/Keras 3, numpy 2) and "mxnet" (mxnet 1.9.1, gluoncv, numpy<1.24).
Installs go through pip with a constraints file (also exported as PIP_CONSTRAINT so isolated build
environments obey it); nox's default virtualenv backend is used because uv ignores pip's
configuration and would fetch CUDA torch.
"""

import os
import shutil
import sys

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
    install(session, MODERN, ".[torch,tf-cpu,test,export,experiments,parity]")
    session.run("pytest", "tests", "--ignore=tests/backend_mxnet", *session.posargs)


@nox.session(name="tests-mxnet", python=PYTHON, tags=["tests"])
def tests_mxnet(session):
    """Core, shared-API and MXNet/GluonCV tests in the MXNet environment (numpy<1.24, no torch)."""
    install(session, MXNET, ".[mxnet,test]")
    session.run("pytest", "tests/core", "tests/api", "tests/backend_mxnet", *session.posargs)


@nox.session(name="install-check", python=PYTHON, tags=["tests"])
@nox.parametrize("editable", [False, True], ids=["wheel", "editable"])
def install_check(session, editable):
    """``pip install .`` and ``pip install -e .`` both map every folder into ``doconv.*``."""
    install(session, MODERN, *(["-e", "."] if editable else ["."]), "pytest")
    session.chdir(session.create_tmp())  # away from the checkout: only the installed mapping counts
    session.run("python", os.path.join(HERE, "tests", "install_check.py"), HERE, "editable" if editable else "wheel")


def shared_env(session, name, constraints, extras):
    """The python of session ``name``'s environment, made here if that session has not run yet, with ``extras``.

    The parity job runs in the test sessions' environments rather than two more of its own: each holds
    torch and TensorFlow or MXNet, several GB on disk, and CI runs both jobs on one clone.
    """
    location = os.path.join(HERE, ".nox", name)
    python = os.path.join(location, "bin", "python")
    if not os.path.exists(python):
        session.run(sys.executable, "-m", "virtualenv", "--python", f"python{PYTHON}", location, external=True)
    session.run(python, "-m", "pip", "install", "-q", "-c", constraints, f".[{extras}]",
                external=True, env={"PIP_CONSTRAINT": constraints})
    return python


@nox.session(venv_backend="none")
def parity(session):
    """The main job: the cross-framework parity report over the core, PyTorch, Keras/TF and MXNet.

    The modern environment exports its trained layers, the MXNet environment checks them and exports
    its own, then the modern environment checks those and prints the combined report. Any mismatch,
    or a framework that could not take part, fails the session.
    """
    modern = shared_env(session, "tests", MODERN, "torch,tf-cpu,parity")
    mxnet = shared_env(session, "tests-mxnet", MXNET, "mxnet,parity")
    exchange = os.path.join(session.create_tmp(), "parity")
    shutil.rmtree(exchange, ignore_errors=True)
    args = session.posargs
    for python, step in ((modern, ["export", exchange, "-f", "core,torch,tf"]),
                         (mxnet, ["export", exchange, "-f", "mxnet"])):
        session.run(python, "-m", "doconv.parity", *step, *args, external=True, success_codes=[0, 1])
    session.run(modern, "-m", "doconv.parity", "check", exchange, "-f", "torch,tf", "--strict",
                "--json", os.path.join(exchange, "report.json"), *args, external=True)
