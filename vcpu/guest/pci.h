/* PCI bus 0 enumeration and BIOS-style BAR assignment. */
#ifndef FW_PCI_H
#define FW_PCI_H

#include <stdbool.h>
#include <stdint.h>

/* Enumerate bus 0, size and assign every BAR, enable decoding. Once. */
void pci_init(void);

/* Print the functions found by pci_init() and their assigned BARs. */
void pci_list(void);

/* Configuration mechanism #1 on bus 0. */
uint32_t pci_cfg_read32(uint8_t dev, uint8_t fn, uint8_t reg);
void pci_cfg_write32(uint8_t dev, uint8_t fn, uint8_t reg, uint32_t v);

/* A function found by pci_init(), as a driver needs it. */
struct pci_device {
	uint8_t dev, fn;
	uint64_t bar[6];    /* assigned address, 0 if none */
	bool bar_is_io[6];
	uint8_t irq_line;
};

/* The index-th function with these IDs (in bus order); false if none. */
bool pci_find(uint16_t vendor, uint16_t device, unsigned index, struct pci_device *out);

#endif
