//! OCI images: layers applied natively into a tree ([`layer`]) and made into the store's ext4.

pub mod layer;
