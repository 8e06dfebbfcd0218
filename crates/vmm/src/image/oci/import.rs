//! Importing image archives: `docker save` tars and OCI image layouts (a directory or a tar).
