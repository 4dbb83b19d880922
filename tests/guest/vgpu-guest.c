/*
 * vgpu-guest: the program the QEMU guest test runs inside a Linux guest whose GPU is
 * served by a vhost-user-gpu backend (tests/src/qemu/guest.rs builds it with
 * `gcc -static -O2` and puts it into the initramfs as /bin/vgpu-guest). Raw ioctls only:
 * the UAPI headers come from linux-libc-dev (linux/fb.h, linux/kd.h) and, since Debian
 * ships the DRM ones there, libdrm-dev (libdrm/drm.h, libdrm/drm_mode.h); no library.
 *
 * It talks to the host on its stdin/stdout (the serial console), one line per event,
 * each starting with "VGPU: ":
 *   1. reports the DRM driver, the connector (status, modes, EDID blob), the sysfs mode
 *      and the fbdev geometry;
 *   2. frame 1: draws the test pattern through an fbdev mmap (console in KD_GRAPHICS);
 *   3. frame 2: a KMS dumb buffer shown with DRM_IOCTL_MODE_SETCRTC;
 *   4. frame 3: a second dumb buffer shown with DRM_IOCTL_MODE_PAGE_FLIP (waits for the
 *      flip-complete event);
 * after each frame it prints "VGPU: frame N ready" and waits for a line from the host
 * (the host compares a screendump against the pattern in between), then powers off.
 * Any failure prints "VGPU: error: ..." and powers off.
 *
 * The pattern (also computed by the host, tests/src/qemu/pattern.rs): for frame k,
 *   r = (3x + y + 37k) & 255, g = (5y + (x >> 2) + 91k) & 255, b = ((x ^ y) + 53k) & 255
 * so every pixel differs between any two frames.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/reboot.h>
#include <unistd.h>

#include <libdrm/drm.h>
#include <libdrm/drm_mode.h>
#include <linux/fb.h>
#include <linux/kd.h>

static void power_off(void)
{
	fflush(stdout);
	sync();
	reboot(RB_POWER_OFF);
	_exit(1);
}

static void say(const char *fmt, ...)
{
	va_list ap;
	fputs("VGPU: ", stdout);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	fputc('\n', stdout);
	fflush(stdout);
}

static void fail(const char *fmt, ...)
{
	va_list ap;
	int err = errno;
	fputs("VGPU: error: ", stdout);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf(" (errno %d: %s)\n", err, strerror(err));
	power_off();
}

static uint8_t pat_r(uint32_t x, uint32_t y, uint32_t k) { return (uint8_t)(3 * x + y + 37 * k); }
static uint8_t pat_g(uint32_t x, uint32_t y, uint32_t k) { return (uint8_t)(5 * y + (x >> 2) + 91 * k); }
static uint8_t pat_b(uint32_t x, uint32_t y, uint32_t k) { return (uint8_t)((x ^ y) + 53 * k); }

/* Waits for the host's go-ahead: one line on stdin. */
static void wait_host(int frame)
{
	char c;
	say("frame %d ready", frame);
	for (;;) {
		ssize_t n = read(0, &c, 1);
		if (n == 1 && c == '\n')
			break;
		if (n == 0)
			fail("stdin closed while waiting for the host after frame %d", frame);
		if (n < 0 && errno != EINTR)
			fail("read stdin");
	}
	say("host acknowledged frame %d", frame);
}

static int xioctl(int fd, unsigned long req, void *arg)
{
	int r;
	do {
		r = ioctl(fd, req, arg);
	} while (r < 0 && (errno == EINTR || errno == EAGAIN));
	return r;
}

static void print_hex(const char *what, const uint8_t *p, size_t n)
{
	char buf[3 * 64 + 1];
	size_t i, m = n < 64 ? n : 64;
	for (i = 0; i < m; i++)
		sprintf(buf + 2 * i, "%02x", p[i]);
	buf[2 * m] = 0;
	say("%s %s", what, buf);
}

struct kms {
	int fd;
	uint32_t conn_id, crtc_id;
	struct drm_mode_modeinfo mode;
};

static void drm_report(struct kms *k)
{
	char name[64] = { 0 };
	struct drm_version ver = { 0 };
	struct drm_mode_card_res res = { 0 };
	uint32_t conns[16], crtcs[16], encs[16];
	struct drm_mode_get_connector gc = { 0 };
	struct drm_mode_modeinfo *modes;
	uint32_t *props;
	uint64_t *values;
	uint32_t i, edid_blob = 0;

	k->fd = open("/dev/dri/card0", O_RDWR | O_CLOEXEC);
	if (k->fd < 0)
		fail("open /dev/dri/card0");
	ver.name = name;
	ver.name_len = sizeof(name) - 1;
	if (xioctl(k->fd, DRM_IOCTL_VERSION, &ver))
		fail("DRM_IOCTL_VERSION");
	say("drm driver=%s version=%d.%d.%d", name, ver.version_major, ver.version_minor,
	    ver.version_patchlevel);

	if (xioctl(k->fd, DRM_IOCTL_MODE_GETRESOURCES, &res))
		fail("DRM_IOCTL_MODE_GETRESOURCES");
	if (res.count_connectors < 1 || res.count_crtcs < 1 || res.count_connectors > 16 ||
	    res.count_crtcs > 16 || res.count_encoders > 16)
		fail("unexpected resources: %u connectors, %u crtcs, %u encoders",
		     res.count_connectors, res.count_crtcs, res.count_encoders);
	res.connector_id_ptr = (uintptr_t)conns;
	res.crtc_id_ptr = (uintptr_t)crtcs;
	res.encoder_id_ptr = (uintptr_t)encs;
	res.count_fbs = 0;
	if (xioctl(k->fd, DRM_IOCTL_MODE_GETRESOURCES, &res))
		fail("DRM_IOCTL_MODE_GETRESOURCES (ids)");
	say("drm resources: %u connectors, %u crtcs, %u encoders, max %ux%u",
	    res.count_connectors, res.count_crtcs, res.count_encoders, res.max_width,
	    res.max_height);

	/* First call with no arrays: counts (and a probe). */
	gc.connector_id = conns[0];
	if (xioctl(k->fd, DRM_IOCTL_MODE_GETCONNECTOR, &gc))
		fail("DRM_IOCTL_MODE_GETCONNECTOR");
	if (gc.count_modes < 1)
		fail("connector %u has no modes (connection %u)", conns[0], gc.connection);
	modes = calloc(gc.count_modes, sizeof(*modes));
	props = calloc(gc.count_props + 1, sizeof(*props));
	values = calloc(gc.count_props + 1, sizeof(*values));
	if (!modes || !props || !values)
		fail("calloc");
	gc.modes_ptr = (uintptr_t)modes;
	gc.props_ptr = (uintptr_t)props;
	gc.prop_values_ptr = (uintptr_t)values;
	gc.count_encoders = 0;
	if (xioctl(k->fd, DRM_IOCTL_MODE_GETCONNECTOR, &gc))
		fail("DRM_IOCTL_MODE_GETCONNECTOR (arrays)");
	k->conn_id = conns[0];
	k->mode = modes[0];
	for (i = 0; i < gc.count_modes; i++) {
		if (modes[i].type & DRM_MODE_TYPE_PREFERRED) {
			k->mode = modes[i];
			break;
		}
	}
	say("connector id=%u type=%u status=%s modes=%u mode=%ux%u@%u", gc.connector_id,
	    gc.connector_type, gc.connection == 1 ? "connected" : "disconnected",
	    gc.count_modes, k->mode.hdisplay, k->mode.vdisplay, k->mode.vrefresh);

	for (i = 0; i < gc.count_props; i++) {
		struct drm_mode_get_property gp = { 0 };
		gp.prop_id = props[i];
		if (xioctl(k->fd, DRM_IOCTL_MODE_GETPROPERTY, &gp))
			fail("DRM_IOCTL_MODE_GETPROPERTY %u", props[i]);
		if (strcmp(gp.name, "EDID") == 0)
			edid_blob = (uint32_t)values[i];
	}
	if (edid_blob) {
		struct drm_mode_get_blob gb = { 0 };
		uint8_t *data;
		gb.blob_id = edid_blob;
		if (xioctl(k->fd, DRM_IOCTL_MODE_GETPROPBLOB, &gb))
			fail("DRM_IOCTL_MODE_GETPROPBLOB");
		data = calloc(1, gb.length + 1);
		if (!data)
			fail("calloc");
		gb.data = (uintptr_t)data;
		if (xioctl(k->fd, DRM_IOCTL_MODE_GETPROPBLOB, &gb))
			fail("DRM_IOCTL_MODE_GETPROPBLOB (data)");
		say("edid blob=%u size=%u", edid_blob, gb.length);
		print_hex("edid head", data, gb.length);
		free(data);
	} else {
		say("edid none");
	}

	/* The CRTC: the one the connector's encoder drives (fbdev set it up), else the first. */
	k->crtc_id = crtcs[0];
	if (gc.encoder_id) {
		struct drm_mode_get_encoder ge = { 0 };
		ge.encoder_id = gc.encoder_id;
		if (xioctl(k->fd, DRM_IOCTL_MODE_GETENCODER, &ge) == 0 && ge.crtc_id)
			k->crtc_id = ge.crtc_id;
	}
	free(modes);
	free(props);
	free(values);
}

static void sysfs_report(void)
{
	glob_t g;
	size_t i;
	if (glob("/sys/class/drm/card*-*/modes", 0, NULL, &g) != 0) {
		say("sysfs modes none");
		return;
	}
	for (i = 0; i < g.gl_pathc; i++) {
		char line[64] = { 0 };
		FILE *f = fopen(g.gl_pathv[i], "r");
		if (!f)
			continue;
		if (fgets(line, sizeof(line), f))
			line[strcspn(line, "\n")] = 0;
		fclose(f);
		say("sysfs %s first=%s", g.gl_pathv[i], line[0] ? line : "(none)");
	}
	globfree(&g);
}

static void fbdev_frame(int frame)
{
	struct fb_var_screeninfo var;
	struct fb_fix_screeninfo fix;
	uint8_t *mem;
	uint32_t x, y;
	int tty, fd = open("/dev/fb0", O_RDWR | O_CLOEXEC);

	if (fd < 0)
		fail("open /dev/fb0");
	if (xioctl(fd, FBIOGET_VSCREENINFO, &var) || xioctl(fd, FBIOGET_FSCREENINFO, &fix))
		fail("FBIOGET_*SCREENINFO");
	say("fb id=%s mode=%ux%u virtual=%ux%u bpp=%u stride=%u rgb_offsets=%u,%u,%u", fix.id,
	    var.xres, var.yres, var.xres_virtual, var.yres_virtual, var.bits_per_pixel,
	    fix.line_length, var.red.offset, var.green.offset, var.blue.offset);
	if (var.bits_per_pixel != 32 || var.red.length != 8 || var.green.length != 8 ||
	    var.blue.length != 8)
		fail("unsupported fb format");

	/* Keep the text console from drawing over the frame. */
	tty = open("/dev/tty0", O_RDWR | O_CLOEXEC);
	if (tty < 0 || xioctl(tty, KDSETMODE, (void *)(uintptr_t)KD_GRAPHICS))
		fail("KDSETMODE KD_GRAPHICS on /dev/tty0");

	mem = mmap(NULL, fix.smem_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (mem == MAP_FAILED)
		fail("mmap /dev/fb0");
	for (y = 0; y < var.yres; y++) {
		uint32_t *row = (uint32_t *)(mem + (size_t)(y + var.yoffset) * fix.line_length);
		for (x = 0; x < var.xres; x++)
			row[x + var.xoffset] = (uint32_t)pat_r(x, y, frame) << var.red.offset |
					       (uint32_t)pat_g(x, y, frame) << var.green.offset |
					       (uint32_t)pat_b(x, y, frame) << var.blue.offset;
	}
	/* Deferred I/O: fsync flushes the damage now instead of after its delay. */
	if (fsync(fd))
		say("fsync /dev/fb0: %s (the deferred flush will do)", strerror(errno));
	/* The mapping and the fd stay: closing them is not needed for the flush. */
}

struct dumb {
	uint32_t handle, pitch, fb_id;
	uint64_t size;
	uint8_t *mem;
};

static void dumb_create(struct kms *k, struct dumb *d, int frame)
{
	struct drm_mode_create_dumb cd = { 0 };
	struct drm_mode_map_dumb md = { 0 };
	struct drm_mode_fb_cmd fb = { 0 };
	uint32_t x, y, w = k->mode.hdisplay, h = k->mode.vdisplay;

	cd.width = w;
	cd.height = h;
	cd.bpp = 32;
	if (xioctl(k->fd, DRM_IOCTL_MODE_CREATE_DUMB, &cd))
		fail("DRM_IOCTL_MODE_CREATE_DUMB %ux%u", w, h);
	d->handle = cd.handle;
	d->pitch = cd.pitch;
	d->size = cd.size;
	md.handle = cd.handle;
	if (xioctl(k->fd, DRM_IOCTL_MODE_MAP_DUMB, &md))
		fail("DRM_IOCTL_MODE_MAP_DUMB");
	d->mem = mmap(NULL, d->size, PROT_READ | PROT_WRITE, MAP_SHARED, k->fd, md.offset);
	if (d->mem == MAP_FAILED)
		fail("mmap dumb buffer");
	for (y = 0; y < h; y++) {
		uint32_t *row = (uint32_t *)(d->mem + (size_t)y * d->pitch);
		for (x = 0; x < w; x++)
			row[x] = (uint32_t)pat_r(x, y, frame) << 16 |
				 (uint32_t)pat_g(x, y, frame) << 8 | pat_b(x, y, frame);
	}
	fb.width = w;
	fb.height = h;
	fb.pitch = d->pitch;
	fb.bpp = 32;
	fb.depth = 24;
	fb.handle = d->handle;
	if (xioctl(k->fd, DRM_IOCTL_MODE_ADDFB, &fb))
		fail("DRM_IOCTL_MODE_ADDFB");
	d->fb_id = fb.fb_id;
}

static void kms_setcrtc(struct kms *k, struct dumb *d)
{
	struct drm_mode_crtc c = { 0 };
	c.crtc_id = k->crtc_id;
	c.fb_id = d->fb_id;
	c.set_connectors_ptr = (uintptr_t)&k->conn_id;
	c.count_connectors = 1;
	c.mode = k->mode;
	c.mode_valid = 1;
	if (xioctl(k->fd, DRM_IOCTL_MODE_SETCRTC, &c))
		fail("DRM_IOCTL_MODE_SETCRTC crtc=%u fb=%u", k->crtc_id, d->fb_id);
	say("setcrtc crtc=%u fb=%u mode=%ux%u", k->crtc_id, d->fb_id, k->mode.hdisplay,
	    k->mode.vdisplay);
}

static void kms_flip(struct kms *k, struct dumb *d)
{
	struct drm_mode_crtc_page_flip f = { 0 };
	struct pollfd p = { .fd = k->fd, .events = POLLIN };
	char buf[256];
	ssize_t n;
	int r;

	f.crtc_id = k->crtc_id;
	f.fb_id = d->fb_id;
	f.flags = DRM_MODE_PAGE_FLIP_EVENT;
	f.user_data = 0x76677075; /* "vgpu" */
	if (xioctl(k->fd, DRM_IOCTL_MODE_PAGE_FLIP, &f))
		fail("DRM_IOCTL_MODE_PAGE_FLIP crtc=%u fb=%u", k->crtc_id, d->fb_id);
	do {
		r = poll(&p, 1, 20000);
	} while (r < 0 && errno == EINTR);
	if (r == 0) {
		errno = ETIMEDOUT;
		fail("no page-flip event within 20 s");
	}
	if (r < 0)
		fail("poll drm fd");
	n = read(k->fd, buf, sizeof(buf));
	if (n < (ssize_t)sizeof(struct drm_event_vblank))
		fail("short drm event read (%zd)", n);
	{
		struct drm_event_vblank ev;
		memcpy(&ev, buf, sizeof(ev));
		if (ev.base.type != DRM_EVENT_FLIP_COMPLETE || ev.user_data != f.user_data)
			fail("unexpected drm event type %u user_data %llx", ev.base.type,
			     (unsigned long long)ev.user_data);
		say("page flip complete crtc=%u fb=%u sequence=%u", ev.crtc_id, d->fb_id,
		    ev.sequence);
	}
}

int main(void)
{
	struct kms k;
	struct dumb a, b;

	setvbuf(stdout, NULL, _IOLBF, 0);
	say("guest program started");
	drm_report(&k);
	sysfs_report();

	fbdev_frame(1);
	wait_host(1);

	dumb_create(&k, &a, 2);
	kms_setcrtc(&k, &a);
	wait_host(2);

	dumb_create(&k, &b, 3);
	kms_flip(&k, &b);
	wait_host(3);

	say("done; powering off");
	power_off();
	return 0;
}
