// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `vhost-user-zram` binary; all logic lives in the library ([`vhost_user_zram::cli`]).

fn main() -> std::process::ExitCode {
    vhost_user_zram::cli::run(std::env::args_os())
}
