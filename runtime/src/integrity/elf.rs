//! What the engine reads of an executed file's ELF headers (a leaf: it
//! imports nothing of the crate): its class (32-bit programs are refused),
//! whether it names an interpreter (whose execution follows), and whether
//! it asks the kernel for an executable stack (refused where the pod's
//! policy denies anonymous executable memory). Two preads at most, once
//! per content (cached with the digest); a file that is no ELF program (a
//! script) has none of these.

use std::os::fd::BorrowedFd;

pub const ELFCLASS64: u8 = 2;
const PT_INTERP: u32 = 3;
const PT_GNU_STACK: u32 = 0x6474_e551;
const PF_X: u32 = 1;

/// What the engine needs of an executed file's ELF headers. Read with the
/// file's digest and cached with it: both are the content's, which the
/// digest cache's key (inode, size, mtime, ctime) names, so a cached
/// execution reads no header again (four preads of ~1 us each on an
/// overlay file, on every execution, until 2026-12-04).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Facts {
    /// The ELF class (`e_ident[EI_CLASS]`), or None when the file is no
    /// ELF program (the kernel runs it through an interpreter that reads
    /// it: a script).
    pub class: Option<u8>,
    /// A 64-bit ELF program naming an interpreter (`PT_INTERP`).
    pub interpreter: bool,
    /// A 64-bit ELF program asking for an executable stack (`PT_GNU_STACK`
    /// with PF_X): the kernel maps its stack executable at execution,
    /// memory no file backs, without a call anyone could refuse.
    pub exec_stack: bool,
}

impl Facts {
    /// Reads the headers of the file open as `fd`: two preads at most.
    pub fn read(fd: BorrowedFd<'_>) -> Facts {
        let mut eh = [0u8; 64];
        let n = nix::sys::uio::pread(fd, &mut eh, 0).unwrap_or(0);
        if n < 5 || eh[..4] != *b"\x7fELF" {
            return Facts::default();
        }
        let mut facts = Facts {
            class: Some(eh[4]),
            ..Facts::default()
        };
        for (kind, flags) in program_headers(fd, &eh[..n]) {
            facts.interpreter |= kind == PT_INTERP;
            facts.exec_stack |= kind == PT_GNU_STACK && flags & PF_X != 0;
        }
        facts
    }
}

/// The (type, flags) of each program header of the 64-bit little-endian
/// ELF program open as `fd` whose first bytes are `eh` (the only kind this
/// node runs natively); empty for anything else.
fn program_headers(fd: BorrowedFd<'_>, eh: &[u8]) -> Vec<(u32, u32)> {
    if eh.len() < 64 || eh[..4] != *b"\x7fELF" || eh[4] != ELFCLASS64 || eh[5] != 1 {
        return Vec::new();
    }
    let phoff = u64::from_le_bytes(eh[32..40].try_into().unwrap_or_default());
    let phentsize = u16::from_le_bytes([eh[54], eh[55]]) as usize;
    let phnum = u16::from_le_bytes([eh[56], eh[57]]) as usize;
    if phentsize < 8 || phnum == 0 || phnum > 256 {
        return Vec::new();
    }
    let Ok(offset) = i64::try_from(phoff) else {
        return Vec::new();
    };
    let mut table = vec![0u8; phentsize * phnum];
    let n = nix::sys::uio::pread(fd, &mut table, offset).unwrap_or(0);
    table[..n.min(table.len())]
        .chunks_exact(phentsize)
        .map(|ph| {
            (
                u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]),
                u32::from_le_bytes([ph[4], ph[5], ph[6], ph[7]]),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn classes_are_told_apart() {
        let d = tempfile::tempdir().unwrap();
        let class_of = |name: &str, bytes: &[u8]| {
            let p = d.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            Facts::read(std::fs::File::open(&p).unwrap().as_fd()).class
        };
        let sh = std::fs::File::open("/bin/sh").unwrap();
        assert_eq!(Facts::read(sh.as_fd()).class, Some(ELFCLASS64));
        assert_eq!(class_of("ia32", b"\x7fELF\x01\x01\x01"), Some(1));
        assert_eq!(class_of("script", b"#!/bin/sh\n"), None);
        assert_eq!(class_of("short", b"\x7fELF"), None);
        assert_eq!(class_of("empty", b""), None);
    }

    #[test]
    fn a_dynamic_program_names_an_interpreter_and_a_static_one_does_not() {
        let has_interpreter = |f: &std::fs::File| Facts::read(f.as_fd()).interpreter;
        let sh = std::fs::File::open("/bin/sh").unwrap();
        assert!(has_interpreter(&sh), "/bin/sh is dynamically linked");
        let ld = std::fs::File::open("/lib64/ld-linux-x86-64.so.2").unwrap();
        assert!(!has_interpreter(&ld), "ld.so is its own");
        let script = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(script.path(), "#!/bin/sh\necho\n").unwrap();
        let f = std::fs::File::open(script.path()).unwrap();
        assert!(!has_interpreter(&f));
    }

    /// /bin/sh asks for no executable stack; the same headers with PF_X
    /// set on its PT_GNU_STACK do.
    #[test]
    fn an_executable_stack_is_seen() {
        let sh = std::fs::read("/bin/sh").unwrap();
        let wants_exec_stack = |f: std::fs::File| Facts::read(f.as_fd()).exec_stack;
        let f = std::fs::File::open("/bin/sh").unwrap();
        assert!(!wants_exec_stack(f));
        let phoff = u64::from_le_bytes(sh[32..40].try_into().unwrap()) as usize;
        let size = u16::from_le_bytes([sh[54], sh[55]]) as usize;
        let num = u16::from_le_bytes([sh[56], sh[57]]) as usize;
        let mut patched = sh.clone();
        let stack = (0..num)
            .map(|i| phoff + i * size)
            .find(|o| u32::from_le_bytes(sh[*o..*o + 4].try_into().unwrap()) == PT_GNU_STACK)
            .expect("/bin/sh has PT_GNU_STACK");
        patched[stack + 4] |= PF_X as u8;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("execstack");
        std::fs::write(&p, &patched).unwrap();
        assert!(wants_exec_stack(std::fs::File::open(&p).unwrap()));
    }
}
