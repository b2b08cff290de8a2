"""Running QEMU: the host (accelerators, KVM verdicts, QEMU binaries), UEFI firmware, the QEMU argv as a
pure function of a ``VmSpec``, and ``VmRun``, one running VM with its QMP socket.

Knows nothing of images or test runs. Imports ``core`` and ``config`` only.
"""
