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
JAX = os.path.join(HERE, "constraints", "jax.txt")


def install(session, constraints, *args):
    session.install("-c", constraints, *args, env={"PIP_CONSTRAINT": constraints})


@nox.session(python=PYTHON, tags=["tests"])
def tests(session):
    """Core, PyTorch, Keras and parity tests in the modern environment (installed with ``pip install .``).

    Keras reads ``KERAS_BACKEND`` once, at import, so the backend-neutral Keras suite (tests/backend_keras)
    runs once per backend: with everything else on TensorFlow, then alone on torch (JAX: ``tests-keras-jax``).
    """
    install(session, MODERN, ".[torch,tf-cpu,test,export,experiments,parity]")
    session.run("pytest", "tests", "--ignore=tests/backend_mxnet", *session.posargs,
                env={"KERAS_BACKEND": "tensorflow"})
    session.run("pytest", "tests/backend_keras", *session.posargs, env={"KERAS_BACKEND": "torch"})


@nox.session(name="tests-mxnet", python=PYTHON, tags=["tests"])
def tests_mxnet(session):
    """Core, shared-API and MXNet/GluonCV tests in the MXNet environment (numpy<1.24, no torch)."""
    install(session, MXNET, ".[mxnet,test]")
    session.run("pytest", "tests/core", "tests/api", "tests/backend_mxnet", *session.posargs)


@nox.session(name="tests-keras-jax", python=PYTHON, tags=["tests"])
def tests_keras_jax(session):
    """The backend-neutral Keras suite on ``KERAS_BACKEND=jax``, in an environment without TensorFlow or torch,
    and the parity harness's keras/jax adapter tests (only this environment can run them)."""
    install(session, JAX, ".[jax,test]")
    session.run("pytest", "tests/backend_keras", "tests/parity/test_keras_backends.py", *session.posargs,
                env={"KERAS_BACKEND": "jax"})


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
    """The main job: the cross-framework parity report over the core, PyTorch, Keras on TensorFlow, PyTorch
    and JAX, and MXNet.

    Four processes export their trained layers to one exchange folder, each checking those already
    there: the modern environment with Keras on TensorFlow, the same environment with Keras on torch
    (Keras runs on one backend per process), the JAX environment, and the MXNet environment. Then every
    process but the last checks the layers exported after it, and the last check prints the combined
    report. Any mismatch, or a framework that could not take part, fails the session.
    """
    modern = shared_env(session, "tests", MODERN, "torch,tf-cpu,parity")
    jax = shared_env(session, "tests-keras-jax", JAX, "jax,parity")
    mxnet = shared_env(session, "tests-mxnet", MXNET, "mxnet,parity")
    exchange = os.path.join(session.create_tmp(), "parity")
    shutil.rmtree(exchange, ignore_errors=True)
    args = session.posargs
    # (python, KERAS_BACKEND, frameworks exported, frameworks checked), in export order
    steps = ((modern, "tensorflow", "core,torch,tf", "torch,tf"), (modern, "torch", "keras/torch", "keras/torch"),
             (jax, "jax", "keras/jax", "keras/jax"), (mxnet, None, "mxnet", None))
    for python, keras, exported, _ in steps:
        session.run(python, "-m", "doconv.parity", "export", exchange, "-f", exported, *args, external=True,
                    success_codes=[0, 1], env={"KERAS_BACKEND": keras} if keras else {})
    checkers = [step for step in steps if step[3]]
    for i, (python, keras, _, checked) in enumerate(checkers):
        last = i == len(checkers) - 1  # its report combines every run: it alone decides the session's result
        final = ["--strict", "--json", os.path.join(exchange, "report.json")] if last else []
        session.run(python, "-m", "doconv.parity", "check", exchange, "-f", checked, *final, *args, external=True,
                    success_codes=[0] if last else [0, 1], env={"KERAS_BACKEND": keras})
