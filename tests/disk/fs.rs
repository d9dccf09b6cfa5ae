//! An ext4 file system in an image file, attached to a loop device and mounted under a temporary
//! directory: made, cut, turned read-only, filled, checked and grown on demand. Dropping it
//! unmounts and detaches the device, also when a test panics.

use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

/// `EXT4_IOC_SHUTDOWN` = `_IOR('X', 125, __u32)`, as in the kernel's `fs/ext4/ext4.h` and in
/// xfstests' `src/godown.c`.
const EXT4_IOC_SHUTDOWN: u32 = 0x8004_587D;
/// Shut down without flushing the journal: a power cut. What was not committed is gone.
pub const GOING_FLAGS_NOLOGFLUSH: u32 = 2;

/// The tools the harness runs. Root's PATH has them; a plain user's PATH may lack `/usr/sbin`.
const TOOLS: [&str; 6] = [
    "losetup",
    "mkfs.ext4",
    "mount",
    "umount",
    "e2fsck",
    "resize2fs",
];

/// Why the disk fault harness cannot run here, or `None` when it can: root, loop devices and the
/// ext4 tools are needed.
pub fn missing_prerequisite() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (loop devices and mount need root; run .ci/disk as root)".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("no /dev/loop-control: this kernel or container has no loop devices".into());
    }
    for tool in TOOLS {
        if tool_path(tool).is_none() {
            return Some(format!(
                "`{tool}` is not installed (e2fsprogs, util-linux, mount)"
            ));
        }
    }
    None
}

fn tool_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Runs a tool; returns its exit code and everything it printed.
fn run(tool: &str, args: &[&str]) -> (i32, String) {
    let program = tool_path(tool).unwrap_or_else(|| PathBuf::from(tool));
    let output = Command::new(&program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("cannot run {}: {error}", program.display()));
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status.code().unwrap_or(-1), text.trim().to_string())
}

/// Runs a tool that must succeed.
fn run_ok(tool: &str, args: &[&str]) -> Result<String, String> {
    let (code, text) = run(tool, args);
    if code == 0 {
        Ok(text)
    } else {
        Err(format!("`{tool} {}` exited {code}: {text}", args.join(" ")))
    }
}

pub struct Ext4Image {
    /// Holds the image file and the mount point; removed after the device is detached.
    _dir: TempDir,
    image: PathBuf,
    mount_point: PathBuf,
    device: Option<String>,
    mounted: bool,
}

impl Ext4Image {
    /// A fresh ext4 file system of `size_mib` MiB (no blocks reserved for root, since the server
    /// runs as root here), on a new loop device, mounted with `options` (`""` for the defaults).
    /// An error here means the machine cannot run the harness at all; the caller skips.
    pub fn create(size_mib: u64, options: &str) -> Result<Ext4Image, String> {
        let dir = tempfile::Builder::new()
            .prefix("ctwa-disk-")
            .tempdir()
            .map_err(|error| format!("cannot make a temporary directory: {error}"))?;
        let image = dir.path().join("ext4.img");
        let mount_point = dir.path().join("mnt");
        std::fs::create_dir(&mount_point)
            .map_err(|error| format!("cannot make {}: {error}", mount_point.display()))?;
        File::create(&image)
            .and_then(|file| file.set_len(size_mib << 20))
            .map_err(|error| format!("cannot make {}: {error}", image.display()))?;
        let mut this = Ext4Image {
            _dir: dir,
            image,
            mount_point,
            device: None,
            mounted: false,
        };
        let image = this.image.to_string_lossy().into_owned();
        run_ok("mkfs.ext4", &["-q", "-F", "-m", "0", &image])?;
        let device = run_ok("losetup", &["--find", "--show", &image])?;
        this.device = Some(device);
        this.try_mount(options)?;
        Ok(this)
    }

    pub fn mount_point(&self) -> &Path {
        &self.mount_point
    }

    /// Where the server keeps its store: a directory on this file system.
    pub fn data_dir(&self) -> PathBuf {
        self.mount_point.join("ctwa-data")
    }

    pub fn device(&self) -> &str {
        self.device.as_deref().expect("the loop device is attached")
    }

    fn try_mount(&mut self, options: &str) -> Result<(), String> {
        let mount_point = self.mount_point.to_string_lossy().into_owned();
        let device = self.device().to_string();
        let mut args = vec!["-t", "ext4"];
        if !options.is_empty() {
            args.extend(["-o", options]);
        }
        args.extend([device.as_str(), mount_point.as_str()]);
        run_ok("mount", &args)?;
        self.mounted = true;
        Ok(())
    }

    /// Mounts the file system again (replaying its journal).
    pub fn mount(&mut self, options: &str) {
        self.try_mount(options)
            .unwrap_or_else(|error| panic!("remounting {}: {error}", self.device()));
    }

    /// Unmounts; every process using the file system must have ended.
    pub fn unmount(&mut self) {
        if !self.mounted {
            return;
        }
        let mount_point = self.mount_point.to_string_lossy().into_owned();
        let mut last = String::new();
        // A process that just died may hold its files for a moment longer.
        for _ in 0..50 {
            match run_ok("umount", &[&mount_point]) {
                Ok(_) => {
                    self.mounted = false;
                    return;
                }
                Err(error) => last = error,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("cannot unmount {mount_point}: {last}");
    }

    /// `ioctl(EXT4_IOC_SHUTDOWN, flags)` on the mounted file system, as xfstests' `godown` does.
    pub fn shutdown(&self, flags: u32) {
        let directory = File::open(&self.mount_point)
            .unwrap_or_else(|error| panic!("cannot open {}: {error}", self.mount_point.display()));
        let mut value = flags;
        // SAFETY: the descriptor is open for the whole call and the argument points to a u32,
        // which is what EXT4_IOC_SHUTDOWN reads.
        let result = unsafe {
            libc::ioctl(
                directory.as_raw_fd(),
                EXT4_IOC_SHUTDOWN as _,
                &mut value as *mut u32,
            )
        };
        assert_eq!(
            result,
            0,
            "EXT4_IOC_SHUTDOWN on {}: {}",
            self.mount_point.display(),
            std::io::Error::last_os_error()
        );
    }

    /// Raises an ext4 error through `/sys/fs/ext4/<dev>/trigger_fs_error`, the path a real
    /// metadata error takes: with `errors=remount-ro` the kernel aborts the journal and turns the
    /// file system read-only under the running server.
    pub fn trigger_error(&self) {
        let name = Path::new(self.device())
            .file_name()
            .expect("a device name")
            .to_string_lossy()
            .into_owned();
        let trigger = PathBuf::from("/sys/fs/ext4")
            .join(name)
            .join("trigger_fs_error");
        std::fs::write(&trigger, "ctwa-relay disk fault harness")
            .unwrap_or_else(|error| panic!("cannot write {}: {error}", trigger.display()));
    }

    /// True when a new file cannot be created on the mount because it is read-only.
    pub fn is_read_only(&self) -> bool {
        let probe = self.mount_point.join(".ro-probe");
        match File::create(&probe) {
            Ok(_) => {
                let _ = std::fs::remove_file(&probe);
                false
            }
            Err(error) => error.raw_os_error() == Some(libc::EROFS),
        }
    }

    /// Bytes an unprivileged or privileged writer can still allocate (no reserve: `-m 0`).
    pub fn free_bytes(&self) -> u64 {
        let path = CString::new(self.mount_point.as_os_str().as_bytes()).unwrap();
        // SAFETY: statvfs fills the zeroed struct; the path is a valid C string.
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        let result = unsafe { libc::statvfs(path.as_ptr(), &mut stat) };
        assert_eq!(result, 0, "statvfs: {}", std::io::Error::last_os_error());
        stat.f_bavail as u64 * stat.f_frsize as u64
    }

    /// Fills the file system with preallocated files beside the store until at most `leave`
    /// bytes are free; returns the files (remove them to free the space).
    pub fn fill_leaving(&self, leave: u64) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for attempt in 0..8 {
            let free = self.free_bytes();
            if free <= leave {
                break;
            }
            let path = self.mount_point.join(format!("filler-{attempt}"));
            let file = File::create(&path)
                .unwrap_or_else(|error| panic!("cannot create {}: {error}", path.display()));
            files.push(path.clone());
            // Block-sized, and a few blocks short so the extent tree's own blocks fit.
            let want = (free - leave).saturating_sub(if attempt == 0 { 64 << 10 } else { 0 });
            let length = want / 4096 * 4096;
            if length == 0 {
                break;
            }
            // SAFETY: the descriptor is open for the call.
            let result = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, length as libc::off_t) };
            if result != 0 {
                let error = std::io::Error::last_os_error();
                assert_eq!(
                    error.raw_os_error(),
                    Some(libc::ENOSPC),
                    "fallocate {}: {error}",
                    path.display()
                );
            }
        }
        files
    }

    /// `e2fsck -fy` on the unmounted device; its exit code (0 clean, 1 errors corrected, …) and
    /// output.
    pub fn fsck(&self) -> (i32, String) {
        assert!(!self.mounted, "e2fsck needs the file system unmounted");
        run("e2fsck", &["-fy", self.device()])
    }

    /// Grows the image to `size_mib` MiB and the file system with it: unmount, `e2fsck -fy`
    /// (which `resize2fs` wants first), `resize2fs`, mount again with `options`. Offline, because
    /// an online resize of a nearly full ext4 can be refused for want of space.
    pub fn grow(&mut self, size_mib: u64, options: &str) {
        self.unmount();
        File::options()
            .write(true)
            .open(&self.image)
            .and_then(|file| file.set_len(size_mib << 20))
            .unwrap_or_else(|error| panic!("cannot grow {}: {error}", self.image.display()));
        let device = self.device().to_string();
        run_ok("losetup", &["--set-capacity", &device]).unwrap_or_else(|error| panic!("{error}"));
        let (code, text) = self.fsck();
        assert!(
            code <= 1,
            "e2fsck -fy {device} before resize2fs exited {code}: {text}"
        );
        run_ok("resize2fs", &[&device]).unwrap_or_else(|error| panic!("{error}"));
        self.mount(options);
    }
}

impl Drop for Ext4Image {
    fn drop(&mut self) {
        if self.mounted {
            let mount_point = self.mount_point.to_string_lossy().into_owned();
            let mut unmounted = false;
            for _ in 0..30 {
                if run("umount", &[&mount_point]).0 == 0 {
                    unmounted = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if !unmounted {
                // Lazy: detached now, released when the last user goes.
                let (code, text) = run("umount", &["-l", &mount_point]);
                if code != 0 {
                    eprintln!("cleanup: cannot unmount {mount_point}: {text}");
                }
            }
        }
        if let Some(device) = self.device.take() {
            let (code, text) = run("losetup", &["-d", &device]);
            if code != 0 {
                eprintln!("cleanup: cannot detach {device}: {text}");
            }
        }
    }
}

/// The files of a store directory with their sizes ("conf 0 B, db 1 204 KiB, snap.… 31 KiB"),
/// to show what a fault left behind.
pub fn describe_store(dir: &Path) -> String {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut entries: Vec<_> = entries.flatten().collect();
        entries.sort_by_key(|entry| entry.file_name());
        for entry in entries {
            let path = entry.path();
            let Ok(metadata) = entry.metadata() else {
                continue;
            };
            if metadata.is_dir() {
                walk(&path, base, out);
            } else {
                let name = path
                    .strip_prefix(base)
                    .unwrap_or(&path)
                    .display()
                    .to_string();
                let size = metadata.len();
                out.push(if size < 10 << 10 {
                    format!("{name} {size} B")
                } else {
                    format!("{name} {} KiB", size >> 10)
                });
            }
        }
    }
    let mut files = Vec::new();
    walk(dir, dir, &mut files);
    if files.is_empty() {
        "no files".into()
    } else {
        files.join(", ")
    }
}
