#include "common/source_tree.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/functional/function_ref.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "common/digest.h"
#include "common/subprocess.h"
#include "common/status_macros.h"

namespace kiln {
namespace fs = std::filesystem;
using kiln::v1::Digest;
using kiln::v1::Directory;

namespace {

constexpr size_t kReadBufferBytes = size_t{256} << 10;

std::string SizeText(uint64_t bytes) {
  return bytes >= (1u << 20) ? absl::StrCat(bytes >> 20, " MiB") : absl::StrCat(bytes, " bytes");
}

absl::Status TooLarge(const SourceTreeLimits& limits) {
  return absl::ResourceExhaustedError(absl::StrCat("source tree is larger than ", SizeText(limits.max_total_bytes),
                                                   "; build from a smaller flake directory"));
}

absl::Status ValidateName(absl::string_view name, absl::string_view where) {
  if (name.empty() || name == "." || name == ".." || name.find('/') != absl::string_view::npos ||
      name.find('\0') != absl::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("source tree entry '", name, "' in '", where, "' is not a plain file name"));
  }
  return absl::OkStatus();
}

// A link stays inside the tree when, read from its directory (`depth` levels
// below the root), its target never climbs above the root. This is lexical:
// materialisation never writes through a link, so it only guards what a
// build might read through one.
absl::Status ValidateLinkTarget(absl::string_view path, absl::string_view target, size_t depth) {
  if (target.empty() || target[0] == '/') {
    return absl::InvalidArgumentError(absl::StrCat("source tree symlink '", path, "' -> '", target,
                                                   "' is absolute or empty; links must stay inside the tree"));
  }
  int64_t level = static_cast<int64_t>(depth);
  for (absl::string_view part : absl::StrSplit(target, '/', absl::SkipEmpty())) {
    if (part == ".") continue;
    level += part == ".." ? -1 : 1;
    if (level < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("source tree symlink '", path, "' -> '", target, "' points outside the tree"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<Directory> ParseDirectory(const Digest& digest, const BlobLookup& lookup, absl::string_view where) {
  const std::string* data = lookup(digest.hash());
  if (data == nullptr) {
    return absl::NotFoundError(absl::StrCat("source tree directory '", where, "' (", digest.hash(), ") is missing"));
  }
  RETURN_IF_ERROR(VerifyBlob(digest, *data));
  Directory dir;
  if (!dir.ParseFromString(*data)) {
    return absl::InvalidArgumentError(absl::StrCat("source tree directory '", where, "' does not parse"));
  }
  return dir;
}

// Checks one directory's entries: valid names, sorted and unique across the
// three lists (one encoding per tree), safe links.
absl::Status ValidateDirectory(const Directory& dir, const std::string& where, size_t depth,
                               const SourceTreeLimits& limits, bool check_links = true) {
  const size_t entries = dir.files_size() + dir.directories_size() + dir.symlinks_size();
  if (entries > limits.max_entries_per_directory) {
    return absl::ResourceExhaustedError(absl::StrCat("source directory '", where, "' has ", entries,
                                                     " entries; the limit is ", limits.max_entries_per_directory));
  }
  std::vector<absl::string_view> names;
  names.reserve(entries);
  auto check_sorted = [&](const auto& list) -> absl::Status {
    for (int i = 0; i < list.size(); ++i) {
      RETURN_IF_ERROR(ValidateName(list[i].name(), where));
      if (i > 0 && !(list[i - 1].name() < list[i].name())) {
        return absl::InvalidArgumentError(
            absl::StrCat("source directory '", where, "' is not sorted or repeats '", list[i].name(), "'"));
      }
      names.push_back(list[i].name());
    }
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(check_sorted(dir.files()));
  RETURN_IF_ERROR(check_sorted(dir.directories()));
  RETURN_IF_ERROR(check_sorted(dir.symlinks()));
  std::sort(names.begin(), names.end());
  if (std::adjacent_find(names.begin(), names.end()) != names.end()) {
    return absl::InvalidArgumentError(absl::StrCat("source directory '", where, "' names an entry twice"));
  }
  for (const auto& link : dir.symlinks()) {
    if (!check_links) break;
    const std::string path = where.empty() ? link.name() : absl::StrCat(where, "/", link.name());
    RETURN_IF_ERROR(ValidateLinkTarget(path, link.target(), depth));
  }
  return absl::OkStatus();
}

// Depth-first walk over a tree, checking each directory before its entries
// are visited. `on_dir` sees every directory (relative path, message);
// returning an error stops the walk.
template <typename OnDir>
absl::Status Walk(const Digest& root, const BlobLookup& lookup, const SourceTreeLimits& limits, OnDir on_dir) {
  struct Pending {
    Digest digest;
    std::string path;
    size_t depth;
  };
  std::vector<Pending> stack{{root, "", 0}};
  uint64_t entries = 0, bytes = 0;
  while (!stack.empty()) {
    Pending p = std::move(stack.back());
    stack.pop_back();
    if (p.depth > limits.max_depth) {
      return absl::ResourceExhaustedError(
          absl::StrCat("source tree is deeper than ", limits.max_depth, " directories at '", p.path, "'"));
    }
    absl::StatusOr<Directory> dir = ParseDirectory(p.digest, lookup, p.path);
    if (!dir.ok()) return dir.status();
    if (absl::Status s = ValidateDirectory(*dir, p.path, p.depth, limits, !limits.allow_external_links); !s.ok()) {
      return s;
    }
    entries += dir->files_size() + dir->directories_size() + dir->symlinks_size();
    bytes += static_cast<uint64_t>(p.digest.size_bytes());
    for (const auto& f : dir->files()) bytes += static_cast<uint64_t>(std::max<int64_t>(0, f.digest().size_bytes()));
    if (entries > limits.max_entries) {
      return absl::ResourceExhaustedError(absl::StrCat("source tree has more than ", limits.max_entries, " entries"));
    }
    if (bytes > limits.max_total_bytes) {
      return TooLarge(limits);
    }
    RETURN_IF_ERROR(on_dir(p.path, *dir));
    for (int i = dir->directories_size() - 1; i >= 0; --i) {
      const auto& child = dir->directories(i);
      stack.push_back(
          {child.digest(), p.path.empty() ? child.name() : absl::StrCat(p.path, "/", child.name()), p.depth + 1});
    }
  }
  return absl::OkStatus();
}

Digest MakeDigest(std::string hash, size_t size) {
  Digest d;
  d.set_hash(std::move(hash));
  d.set_size_bytes(static_cast<int64_t>(size));
  return d;
}

// Calls `fn` with the file's bytes in order, through one reused buffer per
// thread (a fresh zeroed buffer per file cost more than hashing small files).
// `before(fd)` runs once the file is open, before its first read.
absl::Status ReadFileChunks(
    const std::string& path, absl::FunctionRef<void(absl::string_view)> fn,
    absl::FunctionRef<void(int fd)> before = [](int) {}) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat("cannot read ", path, ": ", std::strerror(errno)));
  before(fd);
  thread_local std::unique_ptr<char[]> buffer(new char[kReadBufferBytes]);
  for (;;) {
    const ssize_t n = ::read(fd, buffer.get(), kReadBufferBytes);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      ::close(fd);
      return absl::DataLossError(absl::StrCat("cannot read ", path, ": ", std::strerror(err)));
    }
    if (n == 0) break;
    fn(absl::string_view(buffer.get(), static_cast<size_t>(n)));
  }
  ::close(fd);
  return absl::OkStatus();
}

// Hashes a file by streaming it (no whole copy in memory).
absl::StatusOr<Digest> HashFile(const fs::path& path) {
  Sha256 hasher;
  uint64_t size = 0;
  absl::Status s = ReadFileChunks(path.string(), [&](absl::string_view chunk) {
    hasher.Update(chunk);
    size += chunk.size();
  });
  if (!s.ok()) return s;
  return MakeDigest(hasher.FinishHex(), size);
}

struct Builder {
  const SourceTreeLimits& limits;
  const BuildSourceTreeOptions& options;
  SourceTree tree;
  absl::flat_hash_set<std::string> only_dirs;  // Directories with listed paths below them.
  uint64_t entries = 0;
  uint64_t bytes = 0;

  absl::Status Count(uint64_t n) {
    bytes += n;
    if (bytes > limits.max_total_bytes) return TooLarge(limits);
    return absl::OkStatus();
  }

  absl::Status Add(std::string data, Digest* digest_out) {
    RETURN_IF_ERROR(Count(data.size()));
    *digest_out = DigestOf(data);
    tree.blobs.try_emplace(digest_out->hash(), std::move(data));
    return absl::OkStatus();
  }

  absl::Status AddFile(const fs::path& full, const struct stat& st, Digest* digest_out) {
    if (options.keep_file_data) {
      std::string data;
      RETURN_IF_ERROR(ReadWholeFile(full.string(), data));
      return Add(std::move(data), digest_out);
    }
#ifdef __APPLE__
    const struct timespec& mtime = st.st_mtimespec;
#else
    const struct timespec& mtime = st.st_mtim;
#endif
    const int64_t mtime_ns = static_cast<int64_t>(mtime.tv_sec) * 1000000000 + mtime.tv_nsec;
    const Digest* cached = options.digest_cache == nullptr
                               ? nullptr
                               : options.digest_cache->Lookup(full.string(), static_cast<uint64_t>(st.st_size),
                                                              mtime_ns, static_cast<uint64_t>(st.st_ino));
    if (cached != nullptr) {
      *digest_out = *cached;
    } else {
      absl::StatusOr<Digest> digest = HashFile(full);
      if (!digest.ok()) return digest.status();
      *digest_out = *std::move(digest);
      if (options.digest_cache != nullptr) {
        options.digest_cache->Store(full.string(), static_cast<uint64_t>(st.st_size), mtime_ns,
                                    static_cast<uint64_t>(st.st_ino), *digest_out);
      }
    }
    RETURN_IF_ERROR(Count(static_cast<uint64_t>(digest_out->size_bytes())));
    tree.file_paths.try_emplace(digest_out->hash(), full.string());
    return absl::OkStatus();
  }

  // `all`: everything below is included (no `only` filtering).
  absl::StatusOr<Digest> AddDirectory(const fs::path& dir, const std::string& rel, size_t depth, bool all) {
    if (depth > limits.max_depth) {
      return absl::ResourceExhaustedError(
          absl::StrCat("source tree is deeper than ", limits.max_depth, " directories at ", dir.string()));
    }
    std::vector<std::string> names;
    std::error_code ec;
    for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
      std::string name = it->path().filename().string();
      if (name == ".git") continue;
      names.push_back(std::move(name));
    }
    if (ec) return absl::NotFoundError(absl::StrCat("cannot read ", dir.string(), ": ", ec.message()));
    std::sort(names.begin(), names.end());
    Directory message;
    size_t kept = 0;
    for (const std::string& name : names) {
      const fs::path full = dir / name;
      const std::string child_rel = rel.empty() ? name : absl::StrCat(rel, "/", name);
      const bool listed = all || options.only == nullptr || options.only->contains(child_rel);
      struct stat st;
      if (::lstat(full.c_str(), &st) != 0) return absl::NotFoundError(absl::StrCat("cannot stat ", full.string()));
      if (S_ISDIR(st.st_mode)) {
        if (!listed && !only_dirs.contains(child_rel)) continue;  // Nothing tracked below.
        absl::StatusOr<Digest> child = AddDirectory(full, child_rel, depth + 1, listed);
        if (!child.ok()) return child.status();
        auto* node = message.add_directories();
        node->set_name(name);
        *node->mutable_digest() = *std::move(child);
      } else if (!listed) {
        continue;  // Not tracked.
      } else if (S_ISLNK(st.st_mode)) {
        auto* node = message.add_symlinks();
        node->set_name(name);
        node->set_target(fs::read_symlink(full, ec).string());
        if (ec) return absl::NotFoundError(absl::StrCat("cannot read link ", full.string()));
      } else if (S_ISREG(st.st_mode)) {
        auto* node = message.add_files();
        node->set_name(name);
        node->set_is_executable((st.st_mode & 0111) != 0);
        RETURN_IF_ERROR(AddFile(full, st, node->mutable_digest()));
        ++tree.file_count;
      } else {
        continue;  // Sockets, fifos, devices: not source.
      }
      ++kept;
    }
    entries += kept;
    if (entries > limits.max_entries || kept > limits.max_entries_per_directory) {
      return absl::ResourceExhaustedError(absl::StrCat("more than ", limits.max_entries, " entries under ",
                                                       dir.string(), " (or ", limits.max_entries_per_directory,
                                                       " in one directory)"));
    }
    Digest digest;
    RETURN_IF_ERROR(Add(SerializeDirectory(message), &digest));
    return digest;
  }
};

absl::Status WriteFile(const fs::path& path, absl::string_view data, bool executable) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, executable ? 0755 : 0644);
  if (fd < 0) return absl::InternalError(absl::StrCat("cannot create ", path.string(), ": ", std::strerror(errno)));
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      ::close(fd);
      return absl::InternalError(absl::StrCat("cannot write ", path.string(), ": ", std::strerror(errno)));
    }
    done += static_cast<size_t>(n);
  }
  if (::close(fd) != 0) return absl::InternalError(absl::StrCat("cannot write ", path.string()));
  return absl::OkStatus();
}

}  // namespace

absl::Status ReadWholeFile(const std::string& path, std::string& out) {
  out.clear();
  // Sized once from the open file's length (one path lookup; a file that
  // grows meanwhile still reads whole: appends past the reserve reallocate).
  return ReadFileChunks(
      path, [&](absl::string_view chunk) { out.append(chunk.data(), chunk.size()); },
      [&](int fd) {
        struct stat st;
        if (::fstat(fd, &st) == 0 && st.st_size > 0) out.reserve(static_cast<size_t>(st.st_size));
      });
}

Digest DigestOf(absl::string_view data) { return MakeDigest(Sha256Hex(data), data.size()); }

absl::Status VerifyBlob(const Digest& digest, absl::string_view data) {
  if (static_cast<uint64_t>(digest.size_bytes()) != data.size() || Sha256Hex(data) != digest.hash()) {
    return absl::InvalidArgumentError(absl::StrCat("blob does not match its digest ", digest.hash(), "/",
                                                   digest.size_bytes(), " (got ", Sha256Hex(data), "/", data.size(),
                                                   ")"));
  }
  return absl::OkStatus();
}

std::string SerializeDirectory(const Directory& directory) {
  std::string out;
  directory.SerializeToString(&out);
  return out;
}

absl::StatusOr<SourceTree> BuildSourceTree(const std::string& dir, const SourceTreeLimits& limits,
                                           const BuildSourceTreeOptions& options) {
  if (!fs::is_directory(dir)) return absl::NotFoundError(absl::StrCat("not a directory: ", dir));
  Builder builder{.limits = limits, .options = options, .tree = {}, .only_dirs = {}};
  if (options.only != nullptr) {
    for (const std::string& path : *options.only) {
      for (size_t slash = path.find('/'); slash != std::string::npos; slash = path.find('/', slash + 1)) {
        builder.only_dirs.insert(path.substr(0, slash));
      }
    }
  }
  absl::StatusOr<Digest> root = builder.AddDirectory(dir, "", 0, /*all=*/false);
  if (!root.ok()) return root.status();
  builder.tree.root = *std::move(root);
  builder.tree.total_bytes = builder.bytes;
  return std::move(builder.tree);
}

DigestCache::DigestCache(std::string file) : file_(std::move(file)) {
  std::ifstream in(file_);
  std::string line;
  // One entry per line: hash size mtime_ns inode path (the path last: it may
  // hold spaces).
  while (std::getline(in, line)) {
    std::vector<absl::string_view> parts = absl::StrSplit(line, absl::MaxSplits(' ', 4));
    Entry e;
    if (parts.size() != 5 || !IsSha256Hex(parts[0]) || !absl::SimpleAtoi(parts[1], &e.size) ||
        !absl::SimpleAtoi(parts[2], &e.mtime_ns) || !absl::SimpleAtoi(parts[3], &e.inode)) {
      continue;
    }
    e.digest = MakeDigest(std::string(parts[0]), e.size);
    entries_[std::string(parts[4])] = std::move(e);
  }
}

const Digest* DigestCache::Lookup(const std::string& path, uint64_t size, int64_t mtime_ns, uint64_t inode) const {
  auto it = entries_.find(path);
  if (it == entries_.end() || it->second.size != size || it->second.mtime_ns != mtime_ns || it->second.inode != inode) {
    return nullptr;
  }
  ++hits_;
  return &it->second.digest;
}

void DigestCache::Store(const std::string& path, uint64_t size, int64_t mtime_ns, uint64_t inode,
                        const Digest& digest) {
  const int64_t now_ns = static_cast<int64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
          .count());
  if (mtime_ns > now_ns - 2'000'000'000) return;
  if (path.find('\n') != std::string::npos) return;
  entries_[path] = Entry{size, mtime_ns, inode, digest};
  dirty_ = true;
}

absl::Status DigestCache::Save() {
  if (!dirty_) return absl::OkStatus();
  std::error_code ec;
  fs::create_directories(fs::path(file_).parent_path(), ec);
  const std::string tmp = absl::StrCat(file_, ".tmp.", ::getpid());
  {
    std::ofstream out(tmp, std::ios::trunc);
    for (const auto& [path, e] : entries_) {
      out << e.digest.hash() << ' ' << e.size << ' ' << e.mtime_ns << ' ' << e.inode << ' ' << path << '\n';
    }
    if (!out) return absl::InternalError(absl::StrCat("cannot write ", tmp));
  }
  fs::rename(tmp, file_, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot write ", file_, ": ", ec.message()));
  dirty_ = false;
  return absl::OkStatus();
}

absl::StatusOr<std::optional<absl::flat_hash_set<std::string>>> GitTrackedFiles(const std::string& dir) {
  std::error_code ec;
  bool in_repo = false;
  for (fs::path p = fs::absolute(dir, ec); !p.empty(); p = p.parent_path()) {
    if (fs::exists(p / ".git", ec)) {
      in_repo = true;
      break;
    }
    if (p == p.root_path()) break;
  }
  if (!in_repo) return std::nullopt;
  absl::StatusOr<CommandResult> run = RunCommand(
      {.argv = {"git", "-c", "core.quotepath=off", "ls-files", "-z", "--cached"}, .extra_env = {}, .cwd = dir}, "",
      absl::Seconds(60));
  if (!run.ok() || !run->exit.Success()) return std::nullopt;  // No git: the whole directory, as for a path.
  absl::flat_hash_set<std::string> files;
  for (absl::string_view path : absl::StrSplit(run->stdout_data, '\0', absl::SkipEmpty())) {
    files.insert(std::string(path));
  }
  return files;
}

absl::StatusOr<std::vector<std::string>> ListTreeBlobs(const Digest& root, const BlobLookup& lookup,
                                                       const SourceTreeLimits& limits) {
  std::vector<std::string> out;
  absl::flat_hash_set<std::string> seen;
  auto note = [&](const Digest& d) {
    if (seen.insert(d.hash()).second) out.push_back(d.hash());
  };
  note(root);
  absl::Status s = Walk(root, lookup, limits, [&](const std::string& path, const Directory& dir) -> absl::Status {
    for (const auto& child : dir.directories()) note(child.digest());
    for (const auto& file : dir.files()) {
      if (lookup(file.digest().hash()) == nullptr) {
        return absl::NotFoundError(absl::StrCat("source file '", path.empty() ? "" : path + "/", file.name(), "' (",
                                                file.digest().hash(), ") is missing"));
      }
      note(file.digest());
    }
    return absl::OkStatus();
  });
  if (!s.ok()) return s;
  return out;
}

absl::StatusOr<Digest> FindSubtree(const Digest& root, absl::string_view path, const BlobLookup& lookup) {
  Digest at = root;
  for (absl::string_view part : absl::StrSplit(path, '/', absl::SkipEmpty())) {
    if (part == ".") continue;
    const std::string* data = lookup(at.hash());
    Directory dir;
    if (data == nullptr || !dir.ParseFromString(*data)) {
      return absl::DataLossError(absl::StrCat("source directory ", at.hash(), " is missing or unreadable"));
    }
    auto it = std::find_if(dir.directories().begin(), dir.directories().end(),
                           [&](const kiln::v1::DirectoryNode& n) { return n.name() == part; });
    if (it == dir.directories().end()) {
      return absl::NotFoundError(absl::StrCat("no directory '", path, "' in the source"));
    }
    at = it->digest();
  }
  return at;
}

absl::StatusOr<std::vector<std::pair<std::string, std::string>>> CollectTreeDirectories(
    const Digest& root, const BlobLookup& lookup, const SourceTreeLimits& limits) {
  std::vector<std::pair<std::string, std::string>> out;
  absl::flat_hash_set<std::string> seen;
  const auto add = [&](const Digest& d) {
    if (!seen.insert(d.hash()).second) return;
    const std::string* data = lookup(d.hash());
    if (data != nullptr) out.emplace_back(d.hash(), *data);  // Walk checked it exists.
  };
  add(root);
  absl::Status s = Walk(root, lookup, limits, [&](const std::string&, const Directory& dir) {
    for (const auto& child : dir.directories()) add(child.digest());
    return absl::OkStatus();
  });
  if (!s.ok()) return s;
  return out;
}

int32_t LinkEscape(absl::string_view target) {
  if (target.empty() || target[0] == '/') return TreeSummary::kEscapesTree;
  int64_t level = 0, lowest = 0;
  for (absl::string_view part : absl::StrSplit(target, '/', absl::SkipEmpty())) {
    if (part == ".") continue;
    level += part == ".." ? -1 : 1;
    lowest = std::min(lowest, level);
  }
  return static_cast<int32_t>(std::min<int64_t>(-lowest, TreeSummary::kEscapesTree));
}

absl::StatusOr<Directory> ParseCanonicalDirectory(absl::string_view data, const SourceTreeLimits& limits) {
  Directory dir;
  if (!dir.ParseFromArray(data.data(), static_cast<int>(data.size()))) {
    return absl::InvalidArgumentError("directory blob does not parse");
  }
  if (SerializeDirectory(dir) != data) {
    return absl::InvalidArgumentError("directory blob is not in canonical form");
  }
  RETURN_IF_ERROR(ValidateDirectory(dir, "", 0, limits, /*check_links=*/false));
  return dir;
}

absl::Status CheckTreeSummary(const TreeSummary& summary, const SourceTreeLimits& limits) {
  if (summary.link_escape > 0) {
    return absl::InvalidArgumentError("a symlink in the source tree points outside it (or is absolute)");
  }
  if (summary.depth > limits.max_depth) {
    return absl::ResourceExhaustedError(absl::StrCat("source tree is deeper than ", limits.max_depth, " directories"));
  }
  if (summary.entries > limits.max_entries) {
    return absl::ResourceExhaustedError(absl::StrCat("source tree has more than ", limits.max_entries, " entries"));
  }
  if (summary.bytes > limits.max_total_bytes) return TooLarge(limits);
  return absl::OkStatus();
}

absl::Status MaterializeTree(const Digest& root, const BlobLookup& lookup, const std::string& dest,
                             const SourceTreeLimits& limits) {
  return Walk(root, lookup, limits, [&](const std::string& path, const Directory& dir) -> absl::Status {
    const fs::path here = path.empty() ? fs::path(dest) : fs::path(dest) / path;
    std::error_code ec;
    for (const auto& child : dir.directories()) {
      // The walk visits children after their parent, so each is new here.
      if (!fs::create_directory(here / child.name(), ec) || ec) {
        return absl::InternalError(absl::StrCat("cannot create ", (here / child.name()).string()));
      }
    }
    for (const auto& file : dir.files()) {
      const std::string* data = lookup(file.digest().hash());
      if (data == nullptr) {
        return absl::NotFoundError(
            absl::StrCat("source file '", path, path.empty() ? "" : "/", file.name(), "' is missing"));
      }
      if (absl::Status s = VerifyBlob(file.digest(), *data); !s.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("source file '", path, path.empty() ? "" : "/", file.name(), "': ", s.message()));
      }
      RETURN_IF_ERROR(WriteFile(here / file.name(), *data, file.is_executable()));
    }
    for (const auto& link : dir.symlinks()) {
      fs::create_symlink(link.target(), here / link.name(), ec);
      if (ec) return absl::InternalError(absl::StrCat("cannot create link ", (here / link.name()).string()));
    }
    return absl::OkStatus();
  });
}

}  // namespace kiln
