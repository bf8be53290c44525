/* virtio-blk over PCI, modern (virtio 1.x) interface: vda, vdb, ... */
#ifndef FW_VIRTIO_BLK_H
#define FW_VIRTIO_BLK_H

void virtio_blk_init(void);

#endif
