// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `vhost-user-zram` binary; all logic lives in the library.

fn main() {}
