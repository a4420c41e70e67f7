//! volfs: see README.md.
