//! Run by `make test` after every test process has exited: lists shims,
//! imacri daemons and fd keepers, mounts, bridges and directories that
//! test runs left, and fails if there are any.

fn main() {
    // An fd keeper exits a moment after the last imacri it served (2 s
    // idle): give the last tests' keepers that long.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut found = imacri_integration::cleanup::leftovers();
    while !found.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(250));
        found = imacri_integration::cleanup::leftovers();
    }
    for f in &found {
        println!("left behind: {f}");
    }
    if !found.is_empty() {
        println!("leftovers: 0 passed, 1 failed");
        std::process::exit(1);
    }
    println!("leftovers: nothing of the tests is left on this machine");
}
