//! Run by `make test` after every test process has exited: lists shims,
//! mounts, bridges and directories that test runs left, and fails if there
//! are any.

fn main() {
    let found = imacri_integration::cleanup::leftovers();
    for f in &found {
        println!("left behind: {f}");
    }
    if !found.is_empty() {
        println!("leftovers: 0 passed, 1 failed");
        std::process::exit(1);
    }
    println!("leftovers: nothing of the tests is left on this machine");
}
