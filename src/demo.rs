//! `rsfs-overlay demo`: builds two small lower layers and an empty upper in a temporary
//! directory, mounts them with this very binary, shows the merged view, changes it, shows what
//! landed in the upper, and unmounts.

use std::fs;
use std::io;
use std::path::Path;
use std::process::Command;

fn write(path: &Path, content: &str) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(path, content)
}

fn show_tree(root: &Path, dir: &Path, out: &mut String) -> io::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let rel = path.strip_prefix(root).unwrap_or(&path);
        let meta = fs::symlink_metadata(&path)?;
        if meta.is_dir() {
            out.push_str(&format!("  {}/\n", rel.display()));
            show_tree(root, &path, out)?;
        } else if meta.file_type().is_symlink() {
            out.push_str(&format!(
                "  {} -> {}\n",
                rel.display(),
                fs::read_link(&path)?.display()
            ));
        } else if meta.is_file() {
            let text = fs::read_to_string(&path).unwrap_or_default();
            out.push_str(&format!("  {}: {:?}\n", rel.display(), text.trim_end()));
        } else {
            out.push_str(&format!(
                "  {} (special: whiteout or device)\n",
                rel.display()
            ));
        }
    }
    Ok(())
}

fn print_tree(title: &str, dir: &Path) -> io::Result<()> {
    let mut out = String::new();
    show_tree(dir, dir, &mut out)?;
    println!("{title}\n{out}");
    Ok(())
}

/// Runs the demonstration; needs root (or a user allowed to mount FUSE) and /dev/fuse.
pub fn run() -> io::Result<()> {
    let tmp = tempfile::Builder::new().prefix("rsfs-demo-").tempdir()?;
    let t = tmp.path();
    let (l1, l2, upper, work, merged) = (
        t.join("lower1"),
        t.join("lower2"),
        t.join("upper"),
        t.join("work"),
        t.join("merged"),
    );
    for d in [&upper, &work, &merged] {
        fs::create_dir_all(d)?;
    }
    write(&l2.join("etc/os-release"), "NAME=base image\n")?;
    write(&l2.join("etc/motd"), "hello from the bottom layer\n")?;
    write(&l2.join("bin/tool"), "v1\n")?;
    write(&l1.join("bin/tool"), "v2 (the upper lower layer wins)\n")?;
    write(&l1.join("app/config"), "debug=false\n")?;
    print_tree("lower2 (bottom):", &l2)?;
    print_tree("lower1 (on top of lower2):", &l1)?;

    let exe = std::env::current_exe()?;
    let opts = format!(
        "lowerdir={}:{},upperdir={},workdir={}",
        l1.display(),
        l2.display(),
        upper.display(),
        work.display()
    );
    let status = Command::new(exe)
        .args(["-o", &opts])
        .arg(&merged)
        .status()?;
    if !status.success() {
        return Err(io::Error::other(format!("mount failed ({status})")));
    }
    let result = (|| -> io::Result<()> {
        print_tree("merged view:", &merged)?;
        println!("changing the merged view: edit app/config, delete etc/motd, add notes.txt\n");
        fs::write(merged.join("app/config"), "debug=true\n")?;
        fs::remove_file(merged.join("etc/motd"))?;
        fs::write(merged.join("notes.txt"), "written through the mount\n")?;
        print_tree("merged view after the changes:", &merged)?;
        Ok(())
    })();
    let unmounted = crate::daemon::unmount(&merged);
    result?;
    unmounted?;
    print_tree(
        "upper layer (copy-ups, new files and the whiteout for etc/motd):",
        &upper,
    )?;
    println!("unmounted; the lower layers are unchanged:");
    print_tree("lower2:", &l2)?;
    Ok(())
}
