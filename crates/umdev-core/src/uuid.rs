//! mdev names: UUIDs in the kernel's canonical form.

use std::fmt;

/// An mdev's name: a UUID, shown in the canonical lowercase 8-4-4-4-12 form.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MdevUuid([u8; 16]);

/// Length of the canonical text form.
pub const UUID_STRING_LEN: usize = 36;

/// Why a UUID was refused (always EINVAL at the ABI).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a UUID in the 8-4-4-4-12 form: {0:?}")]
pub struct UuidParseError(pub String);

impl MdevUuid {
    /// Parses exactly 36 characters: hex digits of either case with hyphens at 8, 13, 18
    /// and 23 (what the kernel's `guid_parse` accepts).
    pub fn parse(s: &str) -> Result<MdevUuid, UuidParseError> {
        let err = || UuidParseError(s.chars().take(64).collect());
        let b = s.as_bytes();
        if b.len() != UUID_STRING_LEN {
            return Err(err());
        }
        let mut out = [0u8; 16];
        let mut nibbles = 0usize;
        for (i, &c) in b.iter().enumerate() {
            if matches!(i, 8 | 13 | 18 | 23) {
                if c != b'-' {
                    return Err(err());
                }
                continue;
            }
            let v = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                b'A'..=b'F' => c - b'A' + 10,
                _ => return Err(err()),
            };
            out[nibbles / 2] |= if nibbles % 2 == 0 { v << 4 } else { v };
            nibbles += 1;
        }
        Ok(MdevUuid(out))
    }

    /// What a write to `create` carries: the UUID, optionally followed by one more byte
    /// (the newline of `echo`), as the kernel accepts 36 or 37 bytes.
    pub fn parse_written(data: &[u8]) -> Result<MdevUuid, UuidParseError> {
        let lossy = || UuidParseError(String::from_utf8_lossy(data).chars().take(64).collect());
        if !(UUID_STRING_LEN..=UUID_STRING_LEN + 1).contains(&data.len()) {
            return Err(lossy());
        }
        let s = std::str::from_utf8(&data[..UUID_STRING_LEN]).map_err(|_| lossy())?;
        MdevUuid::parse(s)
    }

    /// A random (version 4) UUID.
    pub fn random() -> MdevUuid {
        let mut b = [0u8; 16];
        let mut filled = 0;
        while filled < b.len() {
            match rustix::rand::getrandom(&mut b[filled..], rustix::rand::GetRandomFlags::empty()) {
                Ok(n) => filled += n,
                Err(rustix::io::Errno::INTR) => {}
                // getrandom(2) cannot fail on Linux past early boot; a clock-based fallback
                // keeps this infallible anyway.
                Err(_) => {
                    let t = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos())
                        .unwrap_or(0);
                    b = (t ^ u128::from(std::process::id())).to_le_bytes();
                    break;
                }
            }
        }
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        MdevUuid(b)
    }

    /// The 16 bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for MdevUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for MdevUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MdevUuid({self})")
    }
}

impl std::str::FromStr for MdevUuid {
    type Err = UuidParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MdevUuid::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: &str = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";

    #[test]
    fn canonical_form_round_trips() {
        assert_eq!(MdevUuid::parse(U).unwrap().to_string(), U);
    }

    #[test]
    fn uppercase_is_accepted_and_shown_lowercase() {
        let u = MdevUuid::parse(&U.to_uppercase()).unwrap();
        assert_eq!(u.to_string(), U);
    }

    #[test]
    fn malformed_uuids_are_refused() {
        for bad in [
            "",
            "83b8f4f2509f382f3c1ee6bfe0fa1001",
            "83b8f4f2-509f-382f-3c1e-e6bfe0fa100",
            "83b8f4f2-509f-382f-3c1e-e6bfe0fa10011",
            "83b8f4f2-509f-382f-3c1e_e6bfe0fa1001",
            "g3b8f4f2-509f-382f-3c1e-e6bfe0fa1001",
            "{3b8f4f2-509f-382f-3c1e-e6bfe0fa1001",
        ] {
            assert!(MdevUuid::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn written_form_takes_one_trailing_byte() {
        assert!(MdevUuid::parse_written(format!("{U}\n").as_bytes()).is_ok());
        assert!(MdevUuid::parse_written(U.as_bytes()).is_ok());
        assert!(MdevUuid::parse_written(format!("{U}\n\n").as_bytes()).is_err());
        assert!(MdevUuid::parse_written(&U.as_bytes()[..35]).is_err());
    }

    #[test]
    fn random_uuids_are_version_4_and_differ() {
        let a = MdevUuid::random();
        let b = MdevUuid::random();
        assert_ne!(a, b);
        let s = a.to_string();
        assert_eq!(&s[14..15], "4");
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"));
        assert_eq!(MdevUuid::parse(&s).unwrap(), a);
    }
}
