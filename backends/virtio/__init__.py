"""virtio 1.x devices over PCI: split virtqueues (queue.py), the virtio-pci transport
(pci.py) and the devices that plug into it (blk.py)."""
