//! `powerfs BACKING MOUNTPOINT`: a FUSE passthrough file system that can
//! "lose power", for the power-loss tests (`tests/powerloss.rs`), in the
//! spirit of LazyFS.
//!
//! Everything is passed through to the backing directory at once, so reads
//! always see what was written, synced or not, and a crash of a process on
//! top (SIGKILL) loses nothing, as with a real page cache. What is not yet
//! durable is remembered as an undo journal:
//!
//! * **file data**: the first write, truncate or size-changing fallocate of
//!   a file since its last `fsync`/`fdatasync` records the file's size then
//!   (its durable size); each later change records the old bytes of the
//!   durable part it overwrites (appends record nothing). `fsync` or
//!   `fdatasync` of the file forgets that record: the data is durable.
//! * **names**: create, mkdir, symlink, unlink, rmdir and rename are
//!   pending until their directory is fsynced (both directories for a
//!   rename), as POSIX requires and RocksDB assumes (it fsyncs the directory
//!   after creating, renaming and deleting files). A removed or replaced
//!   entry is moved to a hidden trash directory in the backing directory
//!   (`.powerfs-trash`, invisible through the mount) until then. Fsyncing
//!   a file does not make its name durable.
//!
//! A **power cut** rolls every file back to its durable size and bytes and
//! undoes every pending name operation, newest first; then the file system
//! unmounts and the process exits, so the kernel's page cache of the mount
//! goes too. The backing directory then holds exactly what a disk would
//! after a power loss that kept only what was synced.
//!
//! Control, one command per line on standard input, one answer per line on
//! standard output:
//!
//! * (at start) `ready` once mounted;
//! * `cut`: the power cut above, then unmount; answers `cut files=F
//!   bytes=B names=N errors=E` (files rolled back, bytes of unsynced data
//!   dropped, name operations undone, roll-back steps that failed) once
//!   unmounted, and exits;
//! * `unmount`, or end of input: a clean shutdown (everything written is
//!   kept, as an OS that syncs its page cache before powering off);
//!   answers `unmounted` once unmounted, and exits.
//!
//! Limits, fine for RocksDB: no hard links (EPERM), no xattrs, POSIX locks
//! are handled by the kernel alone (`LOCK`), fallocate only plain or
//! `FALLOC_FL_KEEP_SIZE`; the backing directory must be one file system;
//! one request at a time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{File, Metadata, OpenOptions};
use std::io::{BufRead, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};

/// Name of the trash directory in the backing directory's root.
const TRASH: &str = ".powerfs-trash";
/// Attributes and names are never cached by the kernel: every size it
/// reports comes from the backing file as it is now.
const TTL: Duration = Duration::ZERO;

type Reply<T> = Result<T, Errno>;

fn io(e: std::io::Error) -> Errno {
    Errno::from(e)
}

/// What a file's data was when it was last synced, as far as it changed
/// since.
struct DataUndo {
    /// A descriptor of its own: the roll-back works after every handle of
    /// the file closed and whatever its name is by then.
    file: File,
    /// Size at the last sync.
    durable_size: u64,
    /// Old bytes of the durable part, by offset, not overlapping.
    saved: BTreeMap<u64, Vec<u8>>,
}

impl DataUndo {
    /// Saves the bytes of `[from, to)` below the durable size not saved
    /// yet: they are still the synced ones.
    fn save(&mut self, from: u64, to: u64) -> std::io::Result<()> {
        let to = to.min(self.durable_size);
        if from >= to {
            return Ok(());
        }
        let mut gaps = Vec::new();
        let mut pos = from;
        let first = self
            .saved
            .range(..=from)
            .next_back()
            .map(|(s, _)| *s)
            .unwrap_or(from);
        for (start, bytes) in self.saved.range(first..to) {
            let end = start + bytes.len() as u64;
            if *start > pos {
                gaps.push((pos, *start));
            }
            pos = pos.max(end);
        }
        if pos < to {
            gaps.push((pos, to));
        }
        for (start, end) in gaps {
            let mut buf = vec![0; (end - start) as usize];
            self.file.read_exact_at(&mut buf, start)?;
            self.saved.insert(start, buf);
        }
        Ok(())
    }

    /// Puts the file back as it was at its last sync; returns the bytes of
    /// unsynced data dropped.
    fn roll_back(&self) -> std::io::Result<u64> {
        let now = self.file.metadata()?.len();
        self.file.set_len(self.durable_size)?;
        let mut dropped = now.saturating_sub(self.durable_size);
        for (start, bytes) in &self.saved {
            self.file.write_all_at(bytes, *start)?;
            dropped += bytes.len() as u64;
        }
        Ok(dropped)
    }
}

/// A name operation not yet made durable by a directory fsync.
struct Pending {
    /// Directories (inode numbers) whose fsync it still waits for.
    dirs: HashSet<u64>,
    op: NameOp,
}

enum NameOp {
    /// A file, symlink or directory created at `path`.
    Created { path: PathBuf, dir: bool },
    /// An entry removed from `path`, kept at `trash` until durable.
    Removed { path: PathBuf, trash: PathBuf },
    /// An entry renamed, and what it replaced (kept at the trash path).
    Renamed {
        from: PathBuf,
        to: PathBuf,
        replaced: Option<PathBuf>,
    },
}

impl NameOp {
    /// Undoes the operation; the file system is as it was right after it.
    fn undo(&self) -> std::io::Result<()> {
        match self {
            NameOp::Created { path, dir: true } => std::fs::remove_dir_all(path),
            NameOp::Created { path, dir: false } => std::fs::remove_file(path),
            NameOp::Removed { path, trash } => std::fs::rename(trash, path),
            NameOp::Renamed { from, to, replaced } => {
                std::fs::rename(to, from)?;
                match replaced {
                    Some(trash) => std::fs::rename(trash, to),
                    None => Ok(()),
                }
            }
        }
    }

    /// The operation is durable: what it removed is gone for good. Returns
    /// the backing inode number of what was deleted.
    fn finish(&self) -> Option<u64> {
        let trash = match self {
            NameOp::Removed { trash, .. } => trash,
            NameOp::Renamed {
                replaced: Some(trash),
                ..
            } => trash,
            _ => return None,
        };
        let meta = std::fs::symlink_metadata(trash).ok()?;
        let gone = if meta.is_dir() {
            std::fs::remove_dir_all(trash)
        } else {
            std::fs::remove_file(trash)
        };
        match gone {
            Ok(()) => Some(meta.ino()),
            Err(e) => {
                eprintln!("powerfs: removing {}: {e}", trash.display());
                None
            }
        }
    }
}

struct Handle {
    ino: u64,
    file: File,
}

struct State {
    root: PathBuf,
    trash: PathBuf,
    next_trash: u64,
    /// FUSE inode → backing path (refreshed at every lookup).
    paths: HashMap<u64, PathBuf>,
    /// Backing inode → FUSE inode, so a file keeps its number across
    /// renames.
    by_backing: HashMap<u64, u64>,
    next_ino: u64,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    data: HashMap<u64, DataUndo>,
    journal: Vec<Pending>,
}

impl State {
    fn path(&self, ino: INodeNo) -> Reply<PathBuf> {
        self.paths.get(&ino.0).cloned().ok_or(Errno::ENOENT)
    }

    /// Path of `name` in directory `parent`; the trash is not a name.
    fn child(&self, parent: INodeNo, name: &OsStr) -> Reply<PathBuf> {
        if parent == INodeNo::ROOT && name == TRASH {
            return Err(Errno::EACCES);
        }
        Ok(self.path(parent)?.join(name))
    }

    /// The FUSE inode of the backing file at `path` (whose metadata is
    /// `meta`), numbered on first sight.
    fn intern(&mut self, path: &Path, meta: &Metadata) -> u64 {
        let ino = match self.by_backing.get(&meta.ino()) {
            Some(ino) => *ino,
            None => {
                self.next_ino += 1;
                self.by_backing.insert(meta.ino(), self.next_ino);
                self.next_ino
            }
        };
        self.paths.insert(ino, path.to_path_buf());
        ino
    }

    fn entry(&mut self, path: &Path) -> Reply<FileAttr> {
        let meta = std::fs::symlink_metadata(path).map_err(io)?;
        let ino = self.intern(path, &meta);
        Ok(attr(ino, &meta))
    }

    fn trash_path(&mut self) -> PathBuf {
        self.next_trash += 1;
        self.trash.join(self.next_trash.to_string())
    }

    /// Moves the entry at `path` to the trash; returns where it went.
    fn move_to_trash(&mut self, path: &Path) -> Reply<PathBuf> {
        let trash = self.trash_path();
        std::fs::rename(path, &trash).map_err(io)?;
        self.repath(path, &trash);
        Ok(trash)
    }

    /// Paths at or below `from` are now at or below `to`.
    fn repath(&mut self, from: &Path, to: &Path) {
        for p in self.paths.values_mut() {
            if let Ok(rest) = p.strip_prefix(from) {
                *p = if rest.as_os_str().is_empty() {
                    to.to_path_buf()
                } else {
                    to.join(rest)
                };
            }
        }
    }

    fn pend(&mut self, dirs: &[INodeNo], op: NameOp) {
        self.journal.push(Pending {
            dirs: dirs.iter().map(|d| d.0).collect(),
            op,
        });
    }

    /// The undo record of inode `ino`'s data, begun with `file`'s current
    /// size if the file has none.
    fn undo_of(&mut self, ino: u64, file: &File) -> std::io::Result<&mut DataUndo> {
        match self.data.entry(ino) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(e) => Ok(e.insert(DataUndo {
                file: file.try_clone()?,
                durable_size: file.metadata()?.len(),
                saved: BTreeMap::new(),
            })),
        }
    }

    /// A file of `ino` to work on: the handle's, or a new descriptor.
    fn file(&self, ino: INodeNo, fh: Option<FileHandle>) -> Reply<File> {
        if let Some(h) = fh.and_then(|fh| self.handles.get(&fh.0)) {
            return h.file.try_clone().map_err(io);
        }
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.path(ino)?)
            .map_err(io)
    }

    fn truncate(&mut self, ino: INodeNo, fh: Option<FileHandle>, size: u64) -> Reply<()> {
        let file = self.file(ino, fh)?;
        let len = file.metadata().map_err(io)?.len();
        self.undo_of(ino.0, &file)
            .and_then(|u| u.save(size, len))
            .map_err(io)?;
        file.set_len(size).map_err(io)
    }

    fn open_handle(&mut self, ino: u64, file: File) -> u64 {
        self.next_fh += 1;
        self.handles.insert(self.next_fh, Handle { ino, file });
        self.next_fh
    }

    /// Name operations that waited for directory `dir`'s fsync and need
    /// no other are durable now.
    fn dir_synced(&mut self, dir: u64) {
        let mut kept = Vec::with_capacity(self.journal.len());
        for mut pending in std::mem::take(&mut self.journal) {
            pending.dirs.remove(&dir);
            if !pending.dirs.is_empty() {
                kept.push(pending);
                continue;
            }
            // The backing file system may reuse a deleted file's inode
            // number: a new file must not get the old one's FUSE inode.
            if let Some(ino) = pending.op.finish().and_then(|b| self.by_backing.remove(&b)) {
                self.paths.remove(&ino);
                self.data.remove(&ino);
            }
        }
        self.journal = kept;
    }

    /// The power cut: see the module documentation.
    fn cut(&mut self) -> String {
        let (mut files, mut bytes, mut errors) = (0, 0, 0);
        for (ino, undo) in self.data.drain() {
            match undo.roll_back() {
                Ok(n) => {
                    files += 1;
                    bytes += n;
                }
                Err(e) => {
                    errors += 1;
                    eprintln!("powerfs: rolling back the data of inode {ino}: {e}");
                }
            }
        }
        let names = self.journal.len();
        for pending in self.journal.drain(..).rev() {
            if let Err(e) = pending.op.undo() {
                errors += 1;
                eprintln!("powerfs: undoing a name operation: {e}");
            }
        }
        errors += self.empty_trash();
        format!("cut files={files} bytes={bytes} names={names} errors={errors}")
    }

    /// A clean shutdown: everything is kept.
    fn persist_all(&mut self) {
        self.data.clear();
        for pending in self.journal.drain(..) {
            let _ = pending.op.finish();
        }
        self.empty_trash();
    }

    /// Removes whatever is left in the trash; returns how many entries
    /// could not be removed.
    fn empty_trash(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.trash) else {
            return 0;
        };
        let mut errors = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            let gone = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            if let Err(e) = gone {
                errors += 1;
                eprintln!("powerfs: removing {}: {e}", path.display());
            }
        }
        errors
    }
}

fn kind(meta: &Metadata) -> FileType {
    FileType::from_std(meta.file_type()).unwrap_or(FileType::RegularFile)
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    let d = Duration::new(secs.unsigned_abs(), nsecs.clamp(0, 999_999_999) as u32);
    if secs >= 0 {
        UNIX_EPOCH + d
    } else {
        UNIX_EPOCH - d
    }
}

fn attr(ino: u64, meta: &Metadata) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: meta.len(),
        blocks: meta.blocks(),
        atime: time(meta.atime(), meta.atime_nsec()),
        mtime: time(meta.mtime(), meta.mtime_nsec()),
        ctime: time(meta.ctime(), meta.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind: kind(meta),
        perm: (meta.mode() & 0o7777) as u16,
        nlink: meta.nlink() as u32,
        uid: meta.uid(),
        gid: meta.gid(),
        rdev: meta.rdev() as u32,
        blksize: meta.blksize() as u32,
        flags: 0,
    }
}

struct PowerFs {
    /// Shared with the control loop in `main`.
    state: Arc<Mutex<State>>,
}

impl PowerFs {
    fn new(root: PathBuf) -> anyhow::Result<Self> {
        let meta = std::fs::metadata(&root)
            .with_context(|| format!("backing directory {}", root.display()))?;
        if !meta.is_dir() {
            bail!("backing directory {} is not a directory", root.display());
        }
        let trash = root.join(TRASH);
        std::fs::create_dir_all(&trash)
            .with_context(|| format!("trash directory {}", trash.display()))?;
        let mut state = State {
            root: root.clone(),
            trash,
            next_trash: 0,
            paths: HashMap::new(),
            by_backing: HashMap::new(),
            next_ino: INodeNo::ROOT.0,
            handles: HashMap::new(),
            next_fh: 0,
            data: HashMap::new(),
            journal: Vec::new(),
        };
        // Left by a powerfs that did not exit cleanly: those removals stand.
        state.empty_trash();
        state.paths.insert(INodeNo::ROOT.0, root);
        state.by_backing.insert(meta.ino(), INodeNo::ROOT.0);
        Ok(Self {
            state: Arc::new(Mutex::new(state)),
        })
    }

    fn lock(&self) -> Reply<MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| Errno::EIO)
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> Reply<T>) -> Reply<T> {
        f(&mut *self.lock()?)
    }
}

impl Filesystem for PowerFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.with(|s| {
            let path = s.child(parent, name).map_err(|_| Errno::ENOENT)?;
            s.entry(&path)
        }) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.with(|s| {
            let meta = match fh.and_then(|fh| s.handles.get(&fh.0)) {
                Some(h) => h.file.metadata().map_err(io)?,
                None => std::fs::symlink_metadata(s.path(ino)?).map_err(io)?,
            };
            Ok(attr(ino.0, &meta))
        }) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.with(|s| {
            let path = s.path(ino)?;
            if let Some(size) = size {
                s.truncate(ino, fh, size)?;
            }
            if let Some(mode) = mode {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(io)?;
            }
            if uid.is_some() || gid.is_some() {
                std::os::unix::fs::lchown(&path, uid, gid).map_err(io)?;
            }
            if atime.is_some() || mtime.is_some() {
                let at = |t: TimeOrNow| match t {
                    TimeOrNow::SpecificTime(t) => t,
                    TimeOrNow::Now => SystemTime::now(),
                };
                let mut times = std::fs::FileTimes::new();
                if let Some(t) = atime {
                    times = times.set_accessed(at(t));
                }
                if let Some(t) = mtime {
                    times = times.set_modified(at(t));
                }
                File::open(&path)
                    .and_then(|f| f.set_times(times))
                    .map_err(io)?;
            }
            let meta = std::fs::symlink_metadata(&path).map_err(io)?;
            Ok(attr(ino.0, &meta))
        }) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.with(|s| std::fs::read_link(s.path(ino)?).map_err(io)) {
            Ok(target) => reply.data(target.as_os_str().as_encoded_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            reply.error(Errno::EPERM);
            return;
        }
        match self.with(|s| {
            let path = s.child(parent, name)?;
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode & !umask & 0o7777)
                .open(&path)
                .map_err(io)?;
            s.pend(
                &[parent],
                NameOp::Created {
                    path: path.clone(),
                    dir: false,
                },
            );
            s.entry(&path)
        }) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        match self.with(|s| {
            let path = s.child(parent, name)?;
            std::fs::create_dir(&path).map_err(io)?;
            s.pend(
                &[parent],
                NameOp::Created {
                    path: path.clone(),
                    dir: true,
                },
            );
            std::fs::set_permissions(
                &path,
                std::fs::Permissions::from_mode(mode & !umask & 0o7777),
            )
            .map_err(io)?;
            s.entry(&path)
        }) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.with(|s| {
            let path = s.child(parent, name)?;
            if std::fs::symlink_metadata(&path).map_err(io)?.is_dir() {
                return Err(Errno::EISDIR);
            }
            let trash = s.move_to_trash(&path)?;
            s.pend(&[parent], NameOp::Removed { path, trash });
            Ok(())
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.with(|s| {
            let path = s.child(parent, name)?;
            if !std::fs::symlink_metadata(&path).map_err(io)?.is_dir() {
                return Err(Errno::ENOTDIR);
            }
            if std::fs::read_dir(&path).map_err(io)?.next().is_some() {
                return Err(Errno::ENOTEMPTY);
            }
            let trash = s.move_to_trash(&path)?;
            s.pend(&[parent], NameOp::Removed { path, trash });
            Ok(())
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        match self.with(|s| {
            let path = s.child(parent, link_name)?;
            std::os::unix::fs::symlink(target, &path).map_err(io)?;
            s.pend(
                &[parent],
                NameOp::Created {
                    path: path.clone(),
                    dir: false,
                },
            );
            s.entry(&path)
        }) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self.with(|s| {
            if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
                return Err(Errno::EINVAL);
            }
            let from = s.child(parent, name)?;
            let to = s.child(newparent, newname)?;
            let meta = std::fs::symlink_metadata(&from).map_err(io)?;
            let replaced = match std::fs::symlink_metadata(&to) {
                Ok(_) if from == to => return Ok(()),
                Ok(_) if flags.contains(RenameFlags::RENAME_NOREPLACE) => {
                    return Err(Errno::EEXIST);
                }
                Ok(old) => {
                    if old.is_dir() != meta.is_dir() {
                        return Err(if old.is_dir() {
                            Errno::EISDIR
                        } else {
                            Errno::ENOTDIR
                        });
                    }
                    if old.is_dir() && std::fs::read_dir(&to).map_err(io)?.next().is_some() {
                        return Err(Errno::ENOTEMPTY);
                    }
                    Some(s.move_to_trash(&to)?)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(io(e)),
            };
            if let Err(e) = std::fs::rename(&from, &to) {
                if let Some(trash) = &replaced {
                    // Put the entry that was to be replaced back.
                    let _ = std::fs::rename(trash, &to);
                    s.repath(trash, &to);
                }
                return Err(io(e));
            }
            s.repath(&from, &to);
            s.pend(&[parent, newparent], NameOp::Renamed { from, to, replaced });
            Ok(())
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // Always read-write: saving old bytes reads through this
        // descriptor too. The kernel enforces the caller's access mode.
        match self.with(|s| {
            let file = s.file(ino, None)?;
            Ok(s.open_handle(ino.0, file))
        }) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.with(|s| {
            let h = s.handles.get(&fh.0).ok_or(Errno::EBADF)?;
            let mut buf = vec![0; size as usize];
            let mut got = 0;
            while got < buf.len() {
                match h.file.read_at(&mut buf[got..], offset + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io(e)),
                }
            }
            buf.truncate(got);
            Ok(buf)
        }) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.with(|s| {
            let h = s.handles.get(&fh.0).ok_or(Errno::EBADF)?;
            let (ino, file) = (h.ino, h.file.try_clone().map_err(io)?);
            s.undo_of(ino, &file)
                .and_then(|u| u.save(offset, offset + data.len() as u64))
                .map_err(io)?;
            file.write_all_at(data, offset).map_err(io)?;
            u32::try_from(data.len()).map_err(|_| Errno::EINVAL)
        }) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        match self.with(|s| {
            s.handles.remove(&fh.0);
            Ok(())
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // The backing file system never loses power: forgetting the undo
        // record is what makes the data durable here.
        match self.with(|s| {
            s.data.remove(&ino.0);
            Ok(())
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let listed = self.with(|s| {
            let path = s.path(ino)?;
            let mut entries = vec![
                (ino.0, FileType::Directory, ".".into()),
                (ino.0, FileType::Directory, "..".into()),
            ];
            let mut names = Vec::new();
            for entry in std::fs::read_dir(&path).map_err(io)? {
                let entry = entry.map_err(io)?;
                if ino == INodeNo::ROOT && entry.file_name() == TRASH {
                    continue;
                }
                names.push(entry);
            }
            names.sort_by_key(|e| e.file_name());
            for entry in names {
                let meta = entry.metadata().map_err(io)?;
                let child = s.intern(&entry.path(), &meta);
                entries.push((child, kind(&meta), entry.file_name()));
            }
            Ok(entries)
        });
        match listed {
            Ok(entries) => {
                for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.with(|s| {
            s.dir_synced(ino.0);
            Ok(())
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self
            .with(|s| nix::sys::statvfs::statvfs(&s.root).map_err(|e| Errno::from_i32(e as i32)))
        {
            Ok(v) => reply.statfs(
                v.blocks(),
                v.blocks_free(),
                v.blocks_available(),
                v.files(),
                v.files_free(),
                v.block_size() as u32,
                v.name_max() as u32,
                v.fragment_size() as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        match self.with(|s| std::fs::symlink_metadata(s.path(ino)?).map_err(io)) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.with(|s| {
            let path = s.child(parent, name)?;
            let (file, created) = match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(mode & !umask & 0o7777)
                .open(&path)
            {
                Ok(f) => (f, true),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if flags & libc::O_EXCL != 0 {
                        return Err(Errno::EEXIST);
                    }
                    let f = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&path)
                        .map_err(io)?;
                    (f, false)
                }
                Err(e) => return Err(io(e)),
            };
            if created {
                s.pend(
                    &[parent],
                    NameOp::Created {
                        path: path.clone(),
                        dir: false,
                    },
                );
            }
            let a = s.entry(&path)?;
            if !created && flags & libc::O_TRUNC != 0 {
                s.truncate(a.ino, None, 0)?;
            }
            let fh = s.open_handle(a.ino.0, file);
            Ok((a, fh))
        }) {
            Ok((a, fh)) => {
                reply.created(&TTL, &a, Generation(0), FileHandle(fh), FopenFlags::empty())
            }
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        use nix::fcntl::{FallocateFlags, fallocate};
        // Punching or collapsing would destroy synced bytes without a
        // record of them.
        if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
            reply.error(Errno::EOPNOTSUPP);
            return;
        }
        match self.with(|s| {
            let h = s.handles.get(&fh.0).ok_or(Errno::EBADF)?;
            let (ino, file) = (h.ino, h.file.try_clone().map_err(io)?);
            if mode == 0 {
                s.undo_of(ino, &file).map_err(io)?;
            }
            let off = i64::try_from(offset).map_err(|_| Errno::EINVAL)?;
            let len = i64::try_from(length).map_err(|_| Errno::EINVAL)?;
            fallocate(&file, FallocateFlags::from_bits_truncate(mode), off, len)
                .map_err(|e| Errno::from_i32(e as i32))
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [backing, mountpoint] = args.as_slice() else {
        bail!("usage: powerfs BACKING MOUNTPOINT");
    };
    let fs = PowerFs::new(backing.clone())?;
    let state = fs.state.clone();
    let control = |f: &dyn Fn(&mut State) -> String| -> anyhow::Result<String> {
        let mut s = state
            .lock()
            .map_err(|_| anyhow::anyhow!("a file system request panicked"))?;
        Ok(f(&mut s))
    };
    let mut config = Config::default();
    // No auto_unmount: fusermount3 (3.14) left the mount behind when this
    // process died; the test harness unmounts on every exit path instead.
    config.mount_options = vec![
        MountOption::FSName("powerfs".into()),
        MountOption::Subtype("powerfs".into()),
    ];
    let session = fuser::spawn_mount(fs, mountpoint, &config)
        .with_context(|| format!("mount powerfs on {}", mountpoint.display()))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    let mut answer = String::from("unmounted");
    for line in std::io::stdin().lock().lines() {
        match line.context("read a command")?.trim() {
            "cut" => {
                answer = control(&State::cut)?;
                break;
            }
            "unmount" => break,
            "" => {}
            other => eprintln!("powerfs: unknown command {other:?}"),
        }
    }
    if answer == "unmounted" {
        control(&|s| {
            s.persist_all();
            String::new()
        })?;
    }
    match session.umount_and_join() {
        // The kernel ends the session of an unmounted file system with
        // ENODEV or, when it tore the connection down first, ECONNABORTED.
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {}
        other => other.context("unmount powerfs")?,
    }
    writeln!(out, "{answer}")?;
    out.flush()?;
    Ok(())
}
