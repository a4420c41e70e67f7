//! POSIX ACLs in their xattr form (`system.posix_acl_access` / `_default`).
//!
//! With `FUSE_POSIX_ACL` the kernel enforces ACLs and caches them, but keeping the mode and
//! the access ACL in step is the filesystem's job, as ext4 does: setting an access ACL sets
//! the mode's permission bits, chmod rewrites the ACL's owner, mask (or group) and other
//! entries, and a new inode inherits its directory's default ACL.

use crate::error::{FsError, FsResult};

pub const ACCESS: &[u8] = b"system.posix_acl_access";
pub const DEFAULT: &[u8] = b"system.posix_acl_default";

const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    tag: u16,
    perm: u16,
    id: u32,
}

fn parse(value: &[u8]) -> FsResult<Vec<Entry>> {
    if value.len() < 4 || (value.len() - 4) % 8 != 0 {
        return Err(FsError::Invalid);
    }
    let version = u32::from_le_bytes([value[0], value[1], value[2], value[3]]);
    if version != VERSION {
        return Err(FsError::Invalid);
    }
    let entries: Vec<Entry> = value[4..]
        .chunks_exact(8)
        .map(|e| Entry {
            tag: u16::from_le_bytes([e[0], e[1]]),
            perm: u16::from_le_bytes([e[2], e[3]]),
            id: u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
        })
        .collect();
    let count = |t: u16| entries.iter().filter(|e| e.tag == t).count();
    let named = count(USER) + count(GROUP);
    let valid_tags = entries
        .iter()
        .all(|e| matches!(e.tag, USER_OBJ | USER | GROUP_OBJ | GROUP | MASK | OTHER));
    if !valid_tags
        || entries.iter().any(|e| e.perm & !7 != 0)
        || count(USER_OBJ) != 1
        || count(GROUP_OBJ) != 1
        || count(OTHER) != 1
        || count(MASK) > 1
        || (named > 0 && count(MASK) != 1)
    {
        return Err(FsError::Invalid);
    }
    Ok(entries)
}

fn serialize(entries: &[Entry]) -> Vec<u8> {
    let mut v = VERSION.to_le_bytes().to_vec();
    for e in entries {
        v.extend_from_slice(&e.tag.to_le_bytes());
        v.extend_from_slice(&e.perm.to_le_bytes());
        v.extend_from_slice(&e.id.to_le_bytes());
    }
    v
}

fn perm_of(entries: &[Entry], tag: u16) -> Option<u32> {
    entries
        .iter()
        .find(|e| e.tag == tag)
        .map(|e| u32::from(e.perm))
}

/// Checks an ACL value; for an access ACL returns the permission bits it implies and
/// whether the mode alone expresses it (then no xattr needs storing).
pub fn validate(value: &[u8]) -> FsResult<(u32, bool)> {
    let e = parse(value)?;
    let owner = perm_of(&e, USER_OBJ).unwrap_or(0);
    let group = perm_of(&e, MASK)
        .or_else(|| perm_of(&e, GROUP_OBJ))
        .unwrap_or(0);
    let other = perm_of(&e, OTHER).unwrap_or(0);
    Ok(((owner << 6) | (group << 3) | other, e.len() == 3))
}

/// The access ACL after `chmod` to `perm`.
pub fn chmod(value: &[u8], perm: u32) -> FsResult<Vec<u8>> {
    let mut e = parse(value)?;
    let has_mask = e.iter().any(|x| x.tag == MASK);
    for x in &mut e {
        match x.tag {
            USER_OBJ => x.perm = ((perm >> 6) & 7) as u16,
            MASK => x.perm = ((perm >> 3) & 7) as u16,
            GROUP_OBJ if !has_mask => x.perm = ((perm >> 3) & 7) as u16,
            OTHER => x.perm = (perm & 7) as u16,
            _ => {}
        }
    }
    Ok(serialize(&e))
}

/// What a new inode gets from its directory's default ACL (`posix_acl_create`): its
/// permission bits and, unless the mode says it all, its access ACL.
pub fn inherit(default: &[u8], perm: u32) -> FsResult<(u32, Option<Vec<u8>>)> {
    let mut e = parse(default)?;
    let has_mask = e.iter().any(|x| x.tag == MASK);
    let mut new_perm = perm & !0o777;
    for x in &mut e {
        match x.tag {
            USER_OBJ => {
                x.perm &= ((perm >> 6) & 7) as u16;
                new_perm |= u32::from(x.perm) << 6;
            }
            MASK => {
                x.perm &= ((perm >> 3) & 7) as u16;
                new_perm |= u32::from(x.perm) << 3;
            }
            GROUP_OBJ if !has_mask => {
                x.perm &= ((perm >> 3) & 7) as u16;
                new_perm |= u32::from(x.perm) << 3;
            }
            OTHER => {
                x.perm &= (perm & 7) as u16;
                new_perm |= u32::from(x.perm);
            }
            _ => {}
        }
    }
    let access = (e.len() > 3).then(|| serialize(&e));
    Ok((new_perm, access))
}

/// An ACL in the long text form of `acl_to_text(3)` with numeric qualifiers, one entry a
/// line, each ending in a newline (`user::rw-\nuser:1234:r--\ngroup::r--\nmask::r--\n
/// other::r--\n`): what GNU tar `--acls` stores in `SCHILY.acl.access`/`.default`, and what
/// GNU tar and libarchive read back. Entries stay in the value's (kernel) order.
pub fn to_text(value: &[u8]) -> FsResult<String> {
    let mut out = String::new();
    for e in parse(value)? {
        let (tag, qualifier) = match e.tag {
            USER_OBJ => ("user", None),
            USER => ("user", Some(e.id)),
            GROUP_OBJ => ("group", None),
            GROUP => ("group", Some(e.id)),
            MASK => ("mask", None),
            _ => ("other", None),
        };
        out.push_str(tag);
        out.push(':');
        if let Some(id) = qualifier {
            out.push_str(&id.to_string());
        }
        out.push(':');
        for (bit, c) in [(4, 'r'), (2, 'w'), (1, 'x')] {
            out.push(if e.perm & bit != 0 { c } else { '-' });
        }
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        serialize(
            &entries
                .iter()
                .map(|&(tag, perm, id)| Entry { tag, perm, id })
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn mask_sets_group_bits_and_chmod_rewrites_mask() {
        let a = acl(&[
            (USER_OBJ, 6, 0),
            (USER, 7, 1234),
            (GROUP_OBJ, 4, 0),
            (MASK, 7, 0),
            (OTHER, 0, 0),
        ]);
        assert_eq!(validate(&a), Ok((0o670, false)));
        let b = chmod(&a, 0o640).expect("valid");
        assert_eq!(validate(&b), Ok((0o640, false)));
    }

    #[test]
    fn minimal_acl_is_the_mode_and_bad_ones_are_einval() {
        let a = acl(&[(USER_OBJ, 7, 0), (GROUP_OBJ, 5, 0), (OTHER, 1, 0)]);
        assert_eq!(validate(&a), Ok((0o751, true)));
        assert_eq!(validate(&a[..7]), Err(FsError::Invalid));
        let no_mask = acl(&[
            (USER_OBJ, 7, 0),
            (USER, 7, 5),
            (GROUP_OBJ, 5, 0),
            (OTHER, 1, 0),
        ]);
        assert_eq!(validate(&no_mask), Err(FsError::Invalid));
    }

    #[test]
    fn inherit_masks_with_requested_mode() {
        let d = acl(&[
            (USER_OBJ, 7, 0),
            (USER, 7, 42),
            (GROUP_OBJ, 7, 0),
            (MASK, 7, 0),
            (OTHER, 5, 0),
        ]);
        let (perm, access) = inherit(&d, 0o644).expect("valid");
        assert_eq!(perm, 0o644);
        assert_eq!(validate(&access.expect("extended")), Ok((0o644, false)));
    }

    #[test]
    fn text_form_is_gnu_tars_with_numeric_ids() {
        let a = acl(&[
            (USER_OBJ, 6, u32::MAX),
            (USER, 5, 1234),
            (GROUP_OBJ, 4, u32::MAX),
            (GROUP, 7, 55),
            (MASK, 7, u32::MAX),
            (OTHER, 0, u32::MAX),
        ]);
        assert_eq!(
            to_text(&a).expect("valid"),
            "user::rw-\nuser:1234:r-x\ngroup::r--\ngroup:55:rwx\nmask::rwx\nother::---\n"
        );
        assert_eq!(to_text(b"junk"), Err(FsError::Invalid));
    }
}
