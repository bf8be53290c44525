/* PCI bus 0 enumeration and BIOS-style BAR assignment. */
#ifndef FW_PCI_H
#define FW_PCI_H

/* Enumerate bus 0, size and assign every BAR, enable decoding. Once. */
void pci_init(void);

/* Print the functions found by pci_init() and their assigned BARs. */
void pci_list(void);

#endif
