//! The vocabulary of the allowlists: a [`Permit`] allows one syscall, with or without
//! conditions on its arguments.

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

/// One allowed syscall.
#[derive(Clone, Debug)]
pub(crate) struct Permit {
    /// The syscall's name, as in `man 2 syscalls`.
    pub name: &'static str,
    /// Its x86_64 number.
    pub nr: i64,
    /// When the call is allowed: any of the alternatives, each a conjunction of argument
    /// checks. Empty: whatever the arguments.
    pub when: Vec<Vec<ArgCheck>>,
}

impl Permit {
    /// Allows the syscall whatever its arguments.
    pub fn any(sys: Sys) -> Permit {
        Permit {
            name: sys.name,
            nr: sys.nr,
            when: Vec::new(),
        }
    }

    /// Allows the syscall when all `checks` hold.
    pub fn when(sys: Sys, checks: Vec<ArgCheck>) -> Permit {
        Permit::when_any(sys, vec![checks])
    }

    /// Allows the syscall when any one of `alternatives` holds in full.
    pub fn when_any(sys: Sys, alternatives: Vec<Vec<ArgCheck>>) -> Permit {
        Permit {
            name: sys.name,
            nr: sys.nr,
            when: alternatives,
        }
    }

    /// Allows the syscall when the 32-bit argument `arg` is one of `values`.
    pub fn arg_in(sys: Sys, arg: u8, values: &[u64]) -> Permit {
        Permit::when_any(
            sys,
            values
                .iter()
                .map(|&v| vec![ArgCheck::eq32(arg, v)])
                .collect(),
        )
    }

    /// The seccompiler rules of this permit (empty: unconditional).
    pub fn rules(&self) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
        self.when
            .iter()
            .map(|checks| {
                let conditions = checks
                    .iter()
                    .map(ArgCheck::condition)
                    .collect::<Result<Vec<_>, _>>()?;
                SeccompRule::new(conditions)
            })
            .collect()
    }
}

/// A syscall's name and x86_64 number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Sys {
    /// The name, as in `man 2 syscalls`.
    pub name: &'static str,
    /// The number.
    pub nr: i64,
}

impl Sys {
    /// From the name of a libc constant (`"SYS_read"`) and its value.
    pub const fn new(constant: &'static str, nr: i64) -> Sys {
        let name = match constant.as_bytes() {
            [b'S', b'Y', b'S', b'_', rest @ ..] => match std::str::from_utf8(rest) {
                Ok(name) => name,
                Err(_) => constant,
            },
            _ => constant,
        };
        Sys { name, nr }
    }
}

/// `sys!(SYS_read)` is the [`Sys`] of `read`, from `libc::SYS_read`.
macro_rules! sys {
    ($constant:ident) => {
        $crate::seccomp::permit::Sys::new(stringify!($constant), libc::$constant)
    };
}
pub(crate) use sys;

/// One check on one syscall argument.
#[derive(Clone, Debug)]
pub(crate) struct ArgCheck {
    arg: u8,
    len: SeccompCmpArgLen,
    op: SeccompCmpOp,
    value: u64,
}

impl ArgCheck {
    /// The low 32 bits of argument `arg` (an `int` argument) equal `value`.
    pub fn eq32(arg: u8, value: u64) -> ArgCheck {
        ArgCheck {
            arg,
            len: SeccompCmpArgLen::Dword,
            op: SeccompCmpOp::Eq,
            value,
        }
    }

    /// The 64-bit argument `arg` equals `value`.
    pub fn eq64(arg: u8, value: u64) -> ArgCheck {
        ArgCheck {
            arg,
            len: SeccompCmpArgLen::Qword,
            op: SeccompCmpOp::Eq,
            value,
        }
    }

    /// The 32-bit argument `arg` has no bit of `mask` set.
    pub fn none_of32(arg: u8, mask: u64) -> ArgCheck {
        ArgCheck {
            arg,
            len: SeccompCmpArgLen::Dword,
            op: SeccompCmpOp::MaskedEq(mask),
            value: 0,
        }
    }

    /// The 32-bit argument `arg` has every bit of `mask` set.
    pub fn all_of32(arg: u8, mask: u64) -> ArgCheck {
        ArgCheck {
            arg,
            len: SeccompCmpArgLen::Dword,
            op: SeccompCmpOp::MaskedEq(mask),
            value: mask,
        }
    }

    /// The 64-bit argument `arg` has every bit of `mask` set.
    pub fn all_of64(arg: u8, mask: u64) -> ArgCheck {
        ArgCheck {
            arg,
            len: SeccompCmpArgLen::Qword,
            op: SeccompCmpOp::MaskedEq(mask),
            value: mask,
        }
    }

    /// The 32-bit argument `arg`, masked with `mask`, equals `value`.
    pub fn masked32(arg: u8, mask: u64, value: u64) -> ArgCheck {
        ArgCheck {
            arg,
            len: SeccompCmpArgLen::Dword,
            op: SeccompCmpOp::MaskedEq(mask),
            value,
        }
    }

    fn condition(&self) -> Result<SeccompCondition, seccompiler::BackendError> {
        SeccompCondition::new(self.arg, self.len.clone(), self.op.clone(), self.value)
    }
}
