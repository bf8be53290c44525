"""Guest firmware for splitvm: freestanding C built by :mod:`vcpu.guest.build`."""
