"""The vcpu process: accelerators (kvm, tcg, qtest), guest memory, routing, ELF loading."""
