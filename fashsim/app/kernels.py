"""How fashsim starts Jupyter kernels (papermill's for the pipeline, Voilà's for the web app):
with their sockets encrypted by CurveZMQ keys that the kernel manager makes for each kernel,
where jupyter_client and pyzmq support it. Without them a kernel's messages cross local TCP ports
as plain text, and ipykernel ≥ 7 warns so on every start."""

from __future__ import annotations


def transport_encryption() -> str | None:
    """``"auto"`` (encrypt when the kernelspec declares CurveZMQ support, as ipykernel's does)
    where this jupyter_client has the setting and pyzmq has CurveZMQ; else None (its default)."""
    import zmq
    from jupyter_client import KernelManager

    if zmq.has("curve") and "transport_encryption" in KernelManager.class_trait_names():
        return "auto"
    return None


def kernel_config():
    """A traitlets ``Config`` for a kernel manager (papermill's ``config=``)."""
    from traitlets.config import Config

    policy = transport_encryption()
    return Config({"KernelManager": {"transport_encryption": policy}}) if policy else Config()


def kernel_arguments() -> list[str]:
    """The same as command-line flags of a Jupyter application (Voilà)."""
    policy = transport_encryption()
    return [f"--KernelManager.transport_encryption={policy}"] if policy else []
