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
    """The main job: the cross-framework parity report over the core, PyTorch, Keras/TF and MXNet.

    The modern environment exports its trained layers, the MXNet environment (built here on first use)
    checks them and exports its own, then the modern environment checks those and prints the combined
    report. Any mismatch, or a framework that could not take part, fails the session.
    """
    install(session, MODERN, ".[torch,tf-cpu,parity]")
    exchange = os.path.join(session.create_tmp(), "parity")
    shutil.rmtree(exchange, ignore_errors=True)
    mx_env = os.path.join(HERE, ".nox", "parity-mxnet-env")
    mx_python = os.path.join(mx_env, "bin", "python")
    if not os.path.exists(mx_python):
        session.run(sys.executable, "-m", "virtualenv", "--python", f"python{PYTHON}", mx_env, external=True)
    session.run(mx_python, "-m", "pip", "install", "-q", "-c", MXNET, ".[mxnet,parity]",
                external=True, env={"PIP_CONSTRAINT": MXNET})
    args = session.posargs
    session.run("doconv-parity", "export", exchange, "-f", "core,torch,tf", *args, success_codes=[0, 1])
    session.run(mx_python, "-m", "doconv.parity", "export", exchange, "-f", "mxnet", *args,
                external=True, success_codes=[0, 1])
    session.run("doconv-parity", "check", exchange, "-f", "torch,tf", "--strict",
                "--json", os.path.join(exchange, "report.json"), *args)
