/* Entry points.
 *
 * _start64 (ELF e_entry): splitvm starts every vCPU here already in 64-bit
 *   long mode at CPL 3, RSP set, RDI = vCPU index.  Nothing privileged may
 *   run on this path.
 * _start32 (multiboot entry_addr): QEMU -kernel enters here in 32-bit
 *   protected mode, paging off, EBX = multiboot info.  We build page tables
 *   and a GDT, switch to long mode and call the same fw_main.
 *
 * The multiboot header uses the a.out kludge (flag bit 16) because QEMU
 * refuses to load 64-bit ELF files through multiboot otherwise. */

#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00010002 /* bit 1: want memory info, bit 16: addresses below */

#define MSR_EFER 0xC0000080
#define EFER_LME 0x100
#define CR0_PE_PG 0x80000001
#define CR4_PAE 0x20
#define PTE_P_W 0x03
#define PDE_2M 0x83 /* present, writable, 2 MiB page */

#define GDT_CODE64 0x08
#define GDT_DATA 0x10

	.section .multiboot, "a"
	.align 4
mb_header:
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)
	.long mb_header         /* header_addr */
	.long __image_start     /* load_addr: start of the flat image */
	.long __load_end        /* load_end_addr: end of .data */
	.long __bss_end         /* bss_end_addr: loader zeroes up to here */
	.long _start32          /* entry_addr */

/* ---- path 1: splitvm, 64-bit, CPL 3 ---------------------------------- */
	.section .text.start, "ax"
	.code64
	.globl _start64
_start64:
	/* Only the boot CPU clears .bss; secondaries go straight to parking
	 * in fw_main, which touches no memory but their stack. */
	movq %rdi, %r12
	testq %rdi, %rdi
	jnz 1f
	cld
	leaq __bss_start(%rip), %rdi
	leaq __bss_end(%rip), %rcx
	subq %rdi, %rcx
	xorl %eax, %eax
	rep stosb
1:
	andq $-16, %rsp         /* SysV ABI: 16-byte aligned before call */
	movq %r12, %rdi         /* cpu_index */
	xorl %esi, %esi         /* no multiboot info */
	call fw_main
2:	jmp 2b                  /* fw_main does not return */

/* ---- path 2: multiboot (QEMU), 32-bit protected mode, CPL 0 ---------- */
	.code32
	.globl _start32
_start32:
	cli
	cld
	movl %ebx, %ebp         /* multiboot info; survives the .bss clear */

	/* The loader should zero .bss, but the page tables must be clean. */
	movl $__bss_start, %edi
	movl $__bss_end, %ecx
	subl %edi, %ecx
	xorl %eax, %eax
	rep stosb
	movl %ebp, mb_info_ptr
	movl $boot_stack_top, %esp

	/* PML4[0] -> PDPT; PDPT[0..3] -> four page directories. */
	movl $boot_pdpt + PTE_P_W, boot_pml4
	movl $boot_pd + PTE_P_W, %eax
	xorl %ecx, %ecx
1:	movl %eax, boot_pdpt(,%ecx,8)
	addl $4096, %eax
	incl %ecx
	cmpl $4, %ecx
	jb 1b

	/* 2048 x 2 MiB identity pages = the first 4 GiB, PCI MMIO included. */
	movl $PDE_2M, %eax
	xorl %ecx, %ecx
2:	movl %eax, boot_pd(,%ecx,8)
	addl $0x200000, %eax
	incl %ecx
	cmpl $2048, %ecx
	jb 2b

	lgdt boot_gdt_desc
	movl %cr4, %eax
	orl $CR4_PAE, %eax
	movl %eax, %cr4
	movl $boot_pml4, %eax
	movl %eax, %cr3
	movl $MSR_EFER, %ecx
	rdmsr
	orl $EFER_LME, %eax
	wrmsr
	movl %cr0, %eax
	orl $CR0_PE_PG, %eax
	movl %eax, %cr0         /* long mode active (compatibility mode) */
	ljmp $GDT_CODE64, $long_mode_entry

	.code64
long_mode_entry:
	movl $GDT_DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs
	movl $boot_stack_top, %esp      /* zero-extends into %rsp */
	xorl %edi, %edi                 /* cpu_index 0 */
	movl mb_info_ptr(%rip), %esi    /* zero-extends into %rsi */
	call fw_main
3:	jmp 3b

	.section .rodata
	.align 8
boot_gdt:
	.quad 0
	.quad 0x00AF9A000000FFFF        /* 0x08: 64-bit code, DPL 0 */
	.quad 0x00CF92000000FFFF        /* 0x10: flat data */
boot_gdt_end:
boot_gdt_desc:
	.word boot_gdt_end - boot_gdt - 1
	.long boot_gdt

	.section .bss.boot, "aw", @nobits
	.align 4096
boot_pml4:	.skip 4096
boot_pdpt:	.skip 4096
boot_pd:	.skip 4 * 4096
	.align 16
boot_stack:	.skip 16384
boot_stack_top:
mb_info_ptr:	.skip 4

	.section .note.GNU-stack, "", @progbits
